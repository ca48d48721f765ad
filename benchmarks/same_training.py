"""Two source trees, one training: the losses and weights of every packaged config, old against new.

A refactor that must not change behaviour is checked here: each packaged pre-training config runs
``--steps`` optimizer steps under the old tree and under the new one (each in its own process on one
thread, the two trees side by side, one per core), from the same seed and data. Then every logged
loss and scalar of every step, every weight of the last checkpoint and the optimizer state are
compared bit for bit. The old weights are loaded through the new tree's method, so a renamed buffer
is followed the way an old checkpoint is loaded.

Usage::

    git worktree add /tmp/old <rev>
    python benchmarks/same_training.py --old /tmp/old/src --new src --out /tmp/same
    python benchmarks/same_training.py --old /tmp/old/src --new src --out /tmp/same --rerun new

Runs already in ``--out`` are reused (``--rerun new`` runs the new tree again after a change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimkit.engine.checkpoint import MODEL_FILE, STATE_FILE, latest_checkpoint
from mimkit.engine.logging import read_metrics
from mimkit.models import load_config, method_from_config

#: Logged values that measure time, not training.
TIMING = {"time", "img_per_s", "elapsed_min", "cuda_peak_mib"}

# Runs one config for a number of steps under whichever mimkit PYTHONPATH selects.
RUNNER = """
import sys, torch
torch.set_num_threads(1)
from mimkit.config import resolve_config_path
try:
    from mimkit.models import load_config
except ImportError:  # a tree from before the composition root loaded configs
    from mimkit.config import load_config
from mimkit.data import build_dataset
from mimkit.engine import pretrain
name, run_dir, steps = resolve_config_path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fixed = [f"run_dir={run_dir}", "train.progress=false", "train.log_every=1", "train.keep_last=0",
         "train.budget_minutes=0", "train.max_minutes=0", "train.ckpt_every_steps=0"]
cfg = load_config(name, fixed)
per_epoch = len(build_dataset(cfg.data, "train")) // (cfg.optim.batch_size * cfg.optim.accum_steps)
pretrain(load_config(name, [*fixed, f"train.epochs={(steps - 0.5) / per_epoch!r}"]))
"""


def packaged_configs(src: Path) -> list[str]:
    """The packaged pre-training configs of a source tree, by name."""
    return sorted(p.stem for p in (src / "mimkit" / "configs" / "pretrain").glob("*.yaml"))


def run_one(src: Path, name: str, run_dir: Path, steps: int) -> float:
    """Train ``name`` for ``steps`` steps with the mimkit of ``src``; returns the wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, name, str(run_dir), str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} under {src}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def compare(name: str, old_dir: Path, new_dir: Path) -> dict[str, object]:
    """Every logged scalar, weight and optimizer tensor of two runs of ``name``, compared exactly."""
    old_rows = {r["step"]: r for r in read_metrics(old_dir)}
    new_rows = {r["step"]: r for r in read_metrics(new_dir)}
    row_diffs, loss_gap = [], 0.0
    for step in sorted(set(old_rows) | set(new_rows)):
        a, b = old_rows.get(step, {}), new_rows.get(step, {})
        keys = (set(a) | set(b)) - TIMING
        diff = sorted(k for k in keys if a.get(k) != b.get(k))
        if diff:
            row_diffs.append(f"step {step}: {', '.join(diff)}")
        if "loss" in a and "loss" in b:
            loss_gap = max(loss_gap, abs(a["loss"] - b["loss"]))
    old_ckpt, new_ckpt = latest_checkpoint(old_dir / "checkpoints"), latest_checkpoint(new_dir / "checkpoints")
    # The old weights go through the new method's loading, as an old checkpoint does.
    method = method_from_config(load_config(str(new_dir / "config.yaml")))
    method.load_state_dict(method.upgrade_state_dict(load_file(str(old_ckpt / MODEL_FILE))))
    old_w = {k: v for k, v in method.state_dict().items()}
    new_w = load_file(str(new_ckpt / MODEL_FILE))
    weight_diffs = sorted(k for k in set(old_w) | set(new_w)
                          if k not in old_w or k not in new_w or not torch.equal(old_w[k], new_w[k]))
    weight_gap = max((float((old_w[k].double() - new_w[k].double()).abs().max())
                      for k in weight_diffs if k in old_w and k in new_w and old_w[k].numel()), default=0.0)
    old_opt = torch.load(old_ckpt / STATE_FILE, weights_only=True)["optimizer"]["state"]
    new_opt = torch.load(new_ckpt / STATE_FILE, weights_only=True)["optimizer"]["state"]
    opt_same = old_opt.keys() == new_opt.keys() and all(
        torch.equal(old_opt[i][k], new_opt[i][k]) for i in old_opt for k in old_opt[i])
    return {"config": name, "steps": [old_ckpt.name, new_ckpt.name], "rows": len(new_rows),
            "row_diffs": row_diffs[:5], "max_loss_gap": loss_gap, "tensors": len(new_w),
            "weight_diffs": weight_diffs[:8], "n_weight_diffs": len(weight_diffs), "max_weight_gap": weight_gap,
            "optimizer_same": opt_same,
            "same": not row_diffs and not weight_diffs and opt_same and old_ckpt.name == new_ckpt.name}


def main() -> int:
    """Run and compare; prints a Markdown table and writes ``same_training.json`` in ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the old tree's src/ folder")
    ap.add_argument("--new", type=Path, required=True, help="the new tree's src/ folder")
    ap.add_argument("--out", type=Path, required=True, help="where the runs go (outside the repository)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--trees", choices=["old", "new", "both"], default="both", help="which trees to run")
    ap.add_argument("--rerun", choices=["none", "new", "both"], default="none")
    ap.add_argument("configs", nargs="*", help="packaged config names (default: every one)")
    args = ap.parse_args()
    # A config only one tree has (a new method) has nothing to be compared with.
    names = args.configs or sorted(set(packaged_configs(args.new)) & set(packaged_configs(args.old)))
    trees = {"old": args.old, "new": args.new}
    jobs = []
    for name in names:
        for tree in ("old", "new") if args.trees == "both" else (args.trees,):
            run_dir = args.out / tree / name
            if args.rerun == "both" or (args.rerun == "new" and tree == "new"):
                shutil.rmtree(run_dir, ignore_errors=True)
            if latest_checkpoint(run_dir / "checkpoints") is None:
                shutil.rmtree(run_dir, ignore_errors=True)
                jobs.append((trees[tree], name, run_dir))
    print(f"# {platform.node()} {'avx512_bf16' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text() else 'no bf16'}"
          f", {time.strftime('%Y-%m-%d %H:%M')}, {len(jobs)} runs of {args.steps} steps", flush=True)
    with ThreadPoolExecutor(2) as pool:  # one run per core
        for (src, name, _), secs in zip(jobs, pool.map(lambda j: run_one(*j, args.steps), jobs),
                                              strict=True):
            print(f"ran {name} under {src} in {secs:.0f} s", flush=True)
    if args.trees != "both":
        return 0
    rows = [compare(name, args.out / "old" / name, args.out / "new" / name) for name in names]
    print("| config | steps | logged rows | max loss gap | weights differing | max weight gap | optimizer | same |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['steps'][1]} | {r['rows']} | {r['max_loss_gap']:.3g} | "
              f"{r['n_weight_diffs']}/{r['tensors']} | {r['max_weight_gap']:.3g} | "
              f"{'same' if r['optimizer_same'] else 'differs'} | {'yes' if r['same'] else 'NO'} |")
        for line in r["row_diffs"] + r["weight_diffs"]:
            print(f"    {line}")
    (args.out / "same_training.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same"] for r in rows) and not any(math.isnan(r["max_loss_gap"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
