"""Training speed in fp32 against bf16 autocast, per packaged config, and the strided depthwise conv.

For each config, one training step (forward, backward, AdamW) on a batch of random images is timed
in fp32 and under the engine's bf16 autocast (the models pick their CPU kernels themselves),
alternating round after round in one process so that the host's drift hits both alike; the figure
is the median over rounds and the ratio bf16 / fp32. This is what ``train.precision=auto`` decides
between on a CPU with native bf16 (AVX512-BF16 or AMX).

``--kernel`` also times two kernels that are slow in bf16 on a CPU, each against what replaces it:
the CvT's strided depthwise 3x3 conv against the same conv at stride 1 sampled every second pixel
(the same numbers), and the flash attention kernel against the math kernel at several sequence
lengths: ``mimkit.backbones.layers.cpu_kernels`` picks the faster one under CPU bf16.

Usage:
    python benchmarks/bench_precision.py cvt_mae_fmnist_s4 cvt_mae_fmnist mae_fmnist --kernel
    python benchmarks/bench_precision.py mae_fmnist,backbone.name=vit_small_p4 --batch 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import engine_step, markdown_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimkit.config import resolve_config_path
from mimkit.engine.optim import build_optimizer
from mimkit.models import load_config, method_from_config


def rate(fn: Callable[[], None], steps: int, items: int) -> float:
    """Items per second over ``steps`` calls of ``fn``."""
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * items / (time.perf_counter() - t)


def alternate(fns: dict[str, Callable[[], None]], rounds: int, steps: int, items: int) -> dict[str, float]:
    """Median items/s of each function, timed in alternation after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            rates[k].append(rate(fn, steps, items))
    return {k: statistics.median(v) for k, v in rates.items()}


def train_step(config: str, batch: int) -> dict[str, Callable[[], None]]:
    """fp32 and bf16 training steps of one config (one model, one optimizer).

    ``config`` is a packaged name or YAML path, optionally followed by comma-separated overrides:
    ``mae_fmnist,backbone.name=vit_small_p4``.
    """
    name, *overrides = config.split(",")
    cfg = load_config(str(resolve_config_path(name)), ["train.device=cpu", *overrides])
    method = method_from_config(cfg).train()
    opt = build_optimizer(method, cfg.optim, 1e-4)
    x = torch.randn(batch, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)

    def step(bf16: bool) -> None:
        engine_step(method, x, opt, torch.device("cpu"), "bf16" if bf16 else "fp32")

    return {"fp32": lambda: step(False), "bf16": lambda: step(True)}


def conv_steps(dim: int, size: int, batch: int) -> dict[str, Callable[[], None]]:
    """Depthwise 3x3 stride-2 conv, strided against sampled stride-1, each in fp32 and bf16."""
    w = torch.randn(dim, 1, 3, 3, requires_grad=True)
    fns = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(batch, dim, size, size, dtype=dtype, requires_grad=True)

        def strided(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            F.conv2d(x, w.to(dtype), None, 2, 1, 1, dim).float().sum().backward()

        def sampled(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            F.conv2d(x, w.to(dtype), None, 1, 1, 1, dim)[..., ::2, ::2].float().sum().backward()

        fns[f"strided {dtype_name}"] = strided
        fns[f"sampled {dtype_name}"] = sampled
    return fns


def attention_steps(shape: tuple[int, int, int, int]) -> dict[str, Callable[[], None]]:
    """``scaled_dot_product_attention`` forward + backward, flash against math kernel, fp32 and bf16."""
    fns = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def run(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, kernel: SDPBackend = kernel) -> None:
                with sdpa_kernel(kernel):
                    F.scaled_dot_product_attention(q, k, v).float().sum().backward()

            fns[f"{'flash' if kernel == SDPBackend.FLASH_ATTENTION else 'math'} {dtype_name}"] = run
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="packaged config names or YAML paths, each optionally "
                    "followed by comma-separated key=value overrides")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per precision per round")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--kernel", action="store_true", help="also time the strided depthwise conv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for config in args.configs:
        med = alternate(train_step(config, args.batch), args.rounds, args.steps, args.batch)
        rows.append([config, round(med["fp32"]), round(med["bf16"]), f"{med['bf16'] / med['fp32']:.2f}x"])
        print(rows[-1], flush=True)
    print("\n" + markdown_table(["config", "fp32 img/s", "bf16 img/s", "bf16 / fp32"], rows))
    if args.kernel:
        rows = []
        for dim, size in ((32, 7), (96, 4), (192, 2), (32, 14)):
            med = alternate(conv_steps(dim, size, args.batch), args.rounds, args.steps * 3, args.batch)
            rows.append([f"{dim} x {size}x{size}", *[f"{1e3 * args.batch / med[k]:.1f}" for k in med]])
        print("\n# depthwise 3x3 stride-2 conv, forward + backward, ms per batch")
        print(markdown_table(["channels x map", *med], rows))
        rows = []
        for heads, length, head_dim in ((3, 13, 64), (4, 50, 32), (3, 100, 64), (3, 160, 64), (6, 197, 64)):
            med = alternate(attention_steps((args.batch, heads, length, head_dim)), args.rounds, args.steps, args.batch)
            rows.append([f"{heads} x {length} x {head_dim}", *[f"{1e3 * args.batch / med[k]:.1f}" for k in med]])
        print("\n# scaled_dot_product_attention, forward + backward, ms per batch (heads x tokens x head dim)")
        print(markdown_table(["shape", *med], rows))


if __name__ == "__main__":
    main()
