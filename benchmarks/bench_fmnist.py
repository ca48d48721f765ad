"""Fashion-MNIST: kNN and linear-probe accuracy of an encoder pre-trained for a fixed CPU budget.

Pre-trains with ``train.budget_minutes`` (the warmup + cosine schedule is fitted to the budget as
the run goes, from the measured step rate), then evaluates the final checkpoint and intermediate ones
(the curve of accuracy against pre-training minutes) with the same frozen-feature protocol as
``mimkit knn`` / ``mimkit linprobe``, beside the raw-pixel and random-init baselines. A short
throughput measurement only spaces the intermediate checkpoints.

Usage:
    python benchmarks/bench_fmnist.py --budget-min 30 --config mae_fmnist [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import checkpoint_minutes, evaluate_subject, markdown_table, measure_img_per_s

from mimkit.config import resolve_config_path
from mimkit.data import build_dataset
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import list_checkpoints, load_state
from mimkit.evaluation.runner import resolve_subject
from mimkit.models import load_config


def evaluate(run: str | None, baseline: str | None, config: str | None, overrides: list[str]) -> dict:
    return evaluate_subject(resolve_subject(run, baseline, config, overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--config", default="mae_fmnist")
    ap.add_argument("--budget-min", type=float, default=30.0)
    ap.add_argument("--curve-points", type=int, default=3, help="intermediate checkpoints to evaluate")
    ap.add_argument("--run-dir", default="runs/bench_fmnist")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="evaluate an existing --run-dir, no pre-training")
    args = ap.parse_args()
    config = str(resolve_config_path(args.config))
    base = [f"run_dir={args.run_dir}", *args.overrides]
    cfg = load_config(config, base)
    if args.eval_only:
        cfg = load_config(str(Path(args.run_dir) / "config.yaml"))
        run_dir, train_min = Path(args.run_dir), float("nan")
        ckpt_every = cfg.train.ckpt_every_steps
    else:
        ips = measure_img_per_s(cfg)
        n_train = len(build_dataset(cfg.data, "train"))
        epochs = args.budget_min * 60 * ips / n_train
        steps_per_epoch = n_train // cfg.optim.batch_size
        ckpt_every = max(1, int(epochs * steps_per_epoch / (args.curve_points + 1)))
        train_over = ["train.epochs=1000", f"train.budget_minutes={args.budget_min}", "train.keep_last=0",
                      f"train.ckpt_every_steps={ckpt_every}", "train.progress=false"]
        cfg = load_config(config, base + train_over)
        print(f"# {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"measured {ips:.0f} img/s (about {epochs:.1f} epochs in {args.budget_min} min)", flush=True)
        t0 = time.perf_counter()
        run_dir = pretrain(cfg)
        train_min = (time.perf_counter() - t0) / 60
    rows = []
    # The curve: the evenly spaced checkpoints and the last one (not every epoch-end checkpoint).
    ckpts = list_checkpoints(run_dir / "checkpoints")
    ckpts = [c for c in ckpts[:-1] if ckpt_every and int(c.name[5:]) % ckpt_every == 0] + ckpts[-1:]
    if args.eval_only and ckpts:
        train_min = checkpoint_minutes(ckpts[-1], run_dir)
    for ck in ckpts:
        res = evaluate(str(ck), None, None, [])
        rows.append({"checkpoint": ck.name, "step": load_state(ck)["step"],
                     "minutes": round(checkpoint_minutes(ck, run_dir), 1), **res})
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_baselines:
        for baseline in ("pixels", "random"):
            res = evaluate(None, baseline, config, base)
            rows.append({"checkpoint": f"baseline: {baseline}", **res})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n# pre-training wall time {train_min:.1f} min; {time.strftime('%Y-%m-%d')}")
    print(markdown_table(["encoder", "pre-train min", "kNN k=20", "kNN k=200", "linear probe"],
                         [[r["checkpoint"], r.get("minutes", "-"), r["knn20"], r["knn200"], r["linprobe"]]
                          for r in rows]))


if __name__ == "__main__":
    main()
