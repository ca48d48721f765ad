"""What the engine's per-step gradient-norm check costs: its time against a whole training step.

The step is the engine's own ``train_step`` (batch 256, one micro-batch, no clipping, which is when
the norm is taken for the finiteness check alone); the norm is timed on the same gradients. Medians
of 6 timed repetitions after 2 warm-ups, per packaged config and precision.

Usage:
    python benchmarks/bench_norm_cost.py [--configs mae_fmnist cvt_mae_fmnist_s4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mimkit.config import resolve_config_path
from mimkit.data import Batch
from mimkit.engine.optim import build_optimizer
from mimkit.engine.step import train_step
from mimkit.models import load_config, method_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["mae_fmnist", "cvt_mae_fmnist_s4"])
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    print(f"# {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| config | precision | step ms | grad-norm ms | share of the step |\n|---|---|---|---|---|")
    for name in args.configs:
        cfg = load_config(resolve_config_path(name), ["train.device=cpu"])
        method = method_from_config(cfg).train()
        opt = build_optimizer(method, cfg.optim, 1e-4)
        x = Batch(torch.randn(args.batch, cfg.data.channels, cfg.data.img_size, cfg.data.img_size))
        for precision in ("fp32", "bf16"):
            step_s, norm_s = [], []
            for _ in range(8):
                t = time.perf_counter()
                train_step(method, method, [x], opt, device=torch.device("cpu"), precision=precision, lr=1e-4,
                           step=0, total_steps=1)
                step_s.append(time.perf_counter() - t)
                method(x).loss.backward()
                t = time.perf_counter()
                torch.nn.utils.get_total_norm([p.grad for p in method.parameters() if p.grad is not None])
                norm_s.append(time.perf_counter() - t)
                opt.zero_grad(set_to_none=True)
            s, n = statistics.median(step_s[2:]), statistics.median(norm_s[2:])
            print(f"| {name} | {precision} | {s * 1e3:.0f} | {n * 1e3:.2f} | {100 * n / s:.2f} % |")


if __name__ == "__main__":
    main()
