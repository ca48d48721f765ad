"""Training images/s of packaged configs, eager against ``torch.compile`` (``train.compile=true``).

Each config and precision builds the method twice from the same seed, once called eagerly and once
through ``torch.compile`` (as the trainer wraps it), and times the engine's own training step
(``train_step`` with the config's clipping and a running step counter over a realistic schedule
length, so that per-step settings change as in a run) on the same pre-fetched batches, so the
figures leave data loading and augmentation out. The two alternate round after round, in turn
first, so that machine noise hits both alike. Reported: the median over rounds, the ratio compiled /
eager, the seconds the first two compiled steps took (the compilation a run pays once at start-up;
inductor's on-disk cache from an earlier call shortens it), and the graphs Dynamo compiled (many
means recompilation, which a run pays again and again).

Usage:
    python benchmarks/bench_compile.py cvt_mae_fmnist_s4 mae_fmnist --precision fp32 bf16 --rounds 5 --steps 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch._dynamo
from common import markdown_table

from mimkit.config import resolve_config_path
from mimkit.data import Batch, build_dataset, build_loader
from mimkit.engine.distributed import resolve_device
from mimkit.engine.optim import build_optimizer
from mimkit.engine.precision import resolve_precision
from mimkit.engine.step import train_step
from mimkit.evaluation.resources import cpu_flags
from mimkit.models import load_config, method_from_config


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer ends when the step has."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def contenders(config: str, precision: str,
               batches_needed: int) -> tuple[dict[str, Callable[[], int]], float, torch.device]:
    """Eager and compiled steppers of one config on the same batches, the compiled warm-up seconds, the device."""
    torch._dynamo.reset()  # no graphs or recompile budget carried over from the previous config
    cfg = load_config(str(resolve_config_path(config)), [f"train.precision={precision}"])
    device = resolve_device(cfg.train.device)
    prec = resolve_precision(cfg.train.precision, device)
    steppers, warmup = {}, 0.0
    for name in ("eager", "compiled"):
        torch.manual_seed(cfg.seed)
        method = method_from_config(cfg).to(device).train()
        model = torch.compile(method) if name == "compiled" else method
        loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, cfg.optim.batch_size, train=True,
                              seed=cfg.seed, views=method.views, batch_multiple=method.batch_multiple)
        total = len(loader) * cfg.train.epochs
        batches = []
        while len(batches) < batches_needed:
            loader.set_epoch(len(batches) // len(loader))
            batches += [Batch.of(b) for b, _ in zip(loader, range(batches_needed - len(batches)), strict=False)]
        opt = build_optimizer(method, cfg.optim, 1e-4)
        counter = iter(range(batches_needed))

        def step(method=method, model=model, batches=batches, opt=opt, counter=counter, total=total) -> int:
            i = next(counter)
            return train_step(model, method, [batches[i]], opt, device=device, precision=prec,
                              lr=opt.param_groups[0]["lr"], step=i, total_steps=total,
                              clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode).images

        t0 = time.perf_counter()
        for _ in range(2):  # compilation (and the allocator's warm-up) happens here
            step()
        sync(device)
        if name == "compiled":
            warmup = time.perf_counter() - t0
        steppers[name] = step
    return steppers, warmup, device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="packaged config names or YAML paths")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="training steps per contender per round")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.node()} ({cpu_flags()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    for config in args.configs:
        for precision in args.precision:
            steppers, warmup, device = contenders(config, precision, 2 + args.rounds * args.steps)
            rates: dict[str, list[float]] = {name: [] for name in steppers}
            for r in range(args.rounds):
                for name in sorted(steppers, reverse=bool(r % 2)):
                    sync(device)
                    t0 = time.perf_counter()
                    seen = sum(steppers[name]() for _ in range(args.steps))
                    sync(device)
                    rates[name].append(seen / (time.perf_counter() - t0))
            eager, compiled = (statistics.median(rates[n]) for n in ("eager", "compiled"))
            graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            rows.append([config, precision, f"{eager:.1f}", f"{compiled:.1f}", f"{compiled / eager:.3f}",
                         f"{warmup:.1f}", graphs])
            print(rows[-1], flush=True)
    print(markdown_table(["config", "precision", "eager img/s", "compiled img/s", "compiled / eager",
                          "first 2 compiled steps (s)", "graphs compiled"], rows))


if __name__ == "__main__":
    main()
