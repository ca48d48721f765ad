"""Training steps per second of several configs, timed in alternation in one process.

Each config (a packaged name or YAML path, optionally followed by comma-separated ``key=value``
overrides) gets its own model and optimizer; one timed call is the engine's training step
(:func:`mimkit.engine.step.train_step`: forward, backward, AdamW) on a fixed batch of random images.
Round after round every config is timed in turn, so the host's drift hits all of them alike; the
figure is the median images per second over rounds, with the spread (lowest and highest round) and
the ratio to the first config. This is the comparison to make when a few per cent matter: separate
calls of ``mimkit resources`` a minute apart differ by more than that on a shared host.

Usage:
    python benchmarks/bench_step.py cvt_mae_fmnist_s4 cvt_mae_fmnist_s4_sparse --threads 1
    python benchmarks/bench_step.py cvt_mae_fmnist_s4 cvt_mae_fmnist_s4,method.sparse=true --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from common import add_step_args, config_method, engine_step, markdown_table, rate, start_steps

import mimkit
from mimkit.engine.precision import resolve_precision


def step_of(config: str, batch: int, precision: str) -> Callable[[], object]:
    """One training step of ``config`` (``NAME[,key=value,...]``) on a fixed random batch."""
    cfg, method, opt = config_method(config)
    x = torch.randn(batch, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)
    resolved = resolve_precision(precision, torch.device("cpu"))
    return lambda: engine_step(method, x, opt, torch.device("cpu"), resolved)


def tree_commit() -> str:
    """The commit of the tree the ``mimkit`` package is imported from, with ``+`` when it has changes."""
    root = Path(mimkit.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap, rounds=9, steps=5, per="config")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--json", type=Path, help="also write the medians and every round's rate here")
    args = ap.parse_args()
    if args.json and args.json.exists():
        ap.error(f"--json {args.json} exists; name a new file (results are never overwritten)")
    start_steps(args, f", {args.precision}, tree {tree_commit()}")
    steps = {c: step_of(c, args.batch, args.precision) for c in args.configs}
    for fn in steps.values():  # warm-up: allocator, kernel choice
        fn()
        fn()
    rates: dict[str, list[float]] = {c: [] for c in steps}
    for r in range(args.rounds):
        for c, fn in steps.items():
            rates[c].append(rate(fn, args.steps, args.batch))
        print(f"round {r + 1}: " + ", ".join(f"{rates[c][-1]:.1f}" for c in steps), flush=True)
    med = {c: statistics.median(v) for c, v in rates.items()}
    first = med[args.configs[0]]
    rows = [[c, f"{med[c]:.1f}", f"{min(rates[c]):.1f}-{max(rates[c]):.1f}", f"{med[c] / first:.2f}"] for c in steps]
    print("\n" + markdown_table(["config", "median img/s", "rounds' range", "ratio to the first"], rows))
    if args.json:
        args.json.write_text(json.dumps({"tree": tree_commit(), "median": med, "rounds": rates}, indent=1))


if __name__ == "__main__":
    main()
