"""Helpers shared by the benchmark scripts: the frozen-feature evaluation and Markdown tables."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mimkit.config import PretrainConfig, resolve_config_path
from mimkit.data import Batch, build_dataset, build_loader
from mimkit.engine.checkpoint import load_state
from mimkit.engine.distributed import resolve_device
from mimkit.engine.logging import read_metrics
from mimkit.engine.optim import build_optimizer
from mimkit.engine.precision import resolve_precision
from mimkit.engine.step import StepResult, train_step
from mimkit.evaluation.resources import peak_rss_mib as vm_hwm_mib  # noqa: F401 (benchmarks' name)
from mimkit.evaluation.runner import Subject, features_for, result_name, run_knn, run_linprobe, write_result
from mimkit.models import load_config, method_from_config


def measure_img_per_s(cfg: PretrainConfig, steps: int = 8) -> float:
    """Training images/s of the configured method: the engine's own step on real batches."""
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    method = method_from_config(cfg).to(device).train()
    batches = iter(build_loader(build_dataset(cfg.data, "train"), cfg.data, cfg.optim.batch_size, train=True,
                                views=method.views))
    opt = build_optimizer(method, cfg.optim, 1e-4)
    t0, seen = 0.0, 0
    for i in range(steps + 2):
        if i == 2:  # the first steps warm up allocator and kernels
            t0, seen = time.perf_counter(), 0
        seen += engine_step(method, next(batches), opt, device, precision).images
    return seen / (time.perf_counter() - t0)


def rate(fn: Callable[[], object], steps: int, items: int) -> float:
    """Items per second over ``steps`` calls of ``fn``."""
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * items / (time.perf_counter() - t)


def alternate(fns: dict[str, Callable[[], object]], rounds: int, steps: int, items: int) -> dict[str, float]:
    """Median items/s of each function, timed in alternation after two warm-up calls each.

    Each round times every function in turn, so a host's drift hits them all alike.
    """
    for fn in fns.values():
        fn()
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            rates[k].append(rate(fn, steps, items))
    return {k: statistics.median(v) for k, v in rates.items()}


def add_step_args(ap: argparse.ArgumentParser, rounds: int, steps: int, per: str) -> None:
    """The arguments of the benchmarks that time training steps of packaged configs in alternation."""
    ap.add_argument("configs", nargs="+", help="packaged config names or YAML paths, each optionally "
                    "followed by comma-separated key=value overrides")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps, help=f"timed steps per {per} per round")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def start_steps(args: argparse.Namespace, extra: str = "") -> None:
    """Set the threads and the seed of :func:`add_step_args`' arguments and print the host line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}{extra}, {time.strftime('%Y-%m-%d %H:%M')}",
          flush=True)


def config_method(config: str) -> tuple[PretrainConfig, torch.nn.Module, torch.optim.Optimizer]:
    """The config, method (in train mode, on the CPU) and AdamW of ``NAME[,key=value,...]``."""
    name, *overrides = config.split(",")
    cfg = load_config(str(resolve_config_path(name)), ["train.device=cpu", *overrides])
    method = method_from_config(cfg).train()
    return cfg, method, build_optimizer(method, cfg.optim, 1e-4)


def engine_step(method: torch.nn.Module, batch: Batch | torch.Tensor, optimizer: torch.optim.Optimizer,
                device: torch.device, precision: str) -> StepResult:
    """One step of the engine's :func:`~mimkit.engine.step.train_step` (no accumulation, no clipping)."""
    return train_step(method, method, [Batch.of(batch)], optimizer, device=device, precision=precision,
                      lr=optimizer.param_groups[0]["lr"], step=0, total_steps=1)


def checkpoint_minutes(ckpt: Path, run_dir: Path) -> float:
    """Training minutes at a checkpoint: saved in its state, else interpolated from the run's log."""
    state = load_state(ckpt)
    if "train_minutes" in state:
        return state["train_minutes"]
    minutes = {r["step"]: r["elapsed_min"] for r in read_metrics(run_dir) if "elapsed_min" in r}
    if not minutes:
        return float("nan")
    near = min(minutes, key=lambda s: abs(s - state["step"]))
    return minutes[near] * state["step"] / max(near, 1)


def evaluate_subject(subject: Subject, train_fraction: float = 1.0) -> dict[str, float]:
    """KNN (k = 20, 200; T = 0.07) and the 100-epoch linear probe, as ``mimkit knn`` / ``linprobe`` run them.

    The JSON results are written beside the checkpoint (or in the baseline's folder) as the CLI does.
    """
    feats = features_for(subject, "auto", "auto", 512, progress=False, train_fraction=train_fraction)
    knn = run_knn(subject, (20, 200), 0.07, feats)
    lin = run_linprobe(feats, 100, 0.1, 1024, 0)
    precision = resolve_precision("auto", resolve_device("auto")) if subject.encoder is not None else "fp32"
    settings = {"train_fraction": train_fraction, "precision": precision}
    write_result(subject, result_name(subject, "knn", settings), knn)
    write_result(subject, result_name(subject, "linprobe", settings), lin)
    return {"knn20": knn["top1_k20"], "knn200": knn["top1_k200"], "linprobe": lin["top1"]}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed with two decimals."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
