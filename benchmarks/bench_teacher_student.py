"""Teacher-student methods against masked image modeling on Fashion-MNIST at an equal CPU budget.

Each model pre-trains for ``--budget-min`` minutes (``train.budget_minutes``) with ``--curve-points``
evenly spaced checkpoints, each evaluated with kNN (k = 20, 200) and the linear probe on a per-class
``--train-fraction`` of the train split (the curve of accuracy against minutes); the last one is then
evaluated with the full protocol (the whole train split as bank and probe set) beside raw pixels,
and fine-tuned for ``--finetune-min`` minutes. ``mimkit resources`` measures every config's training
images/s and peak memory in its own process.

    MAE (ViT), CvT-MAE (stride 4), DINO (ViT), DINO (CvT), iBOT (ViT)

Usage (two models side by side, one core each, then a last call for the tables and the figure):
    python benchmarks/bench_teacher_student.py --budget-min 30 --threads 1 --shard 0/2 --out RUNS
    python benchmarks/bench_teacher_student.py --budget-min 30 --threads 1 --shard 1/2 --out RUNS
    python benchmarks/bench_teacher_student.py --budget-min 30 --out RUNS
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from cells import Cell, cell_dir, finetune_cell, knn_curve
from common import evaluate_subject, markdown_table

from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.evaluation.resources import cpu_flags, measure_configs, resources_table
from mimkit.evaluation.runner import resolve_subject
from mimkit.viz import first_minutes_at, save_accuracy_curves

MODELS = [
    Cell("MAE (ViT)", "mae_fmnist"),
    Cell("CvT-MAE (stride 4)", "cvt_mae_fmnist_s4"),
    Cell("DINO (ViT)", "dino_fmnist"),
    Cell("DINO (CvT)", "dino_cvt_fmnist"),
    Cell("iBOT (ViT)", "ibot_fmnist"),
]


def final_row(cell: Cell, out: Path, finetune_min: float) -> dict:
    """The last checkpoint under the full protocol, and its fine-tuning (written once, then read)."""
    run_dir = cell_dir(out, cell)
    result_file = run_dir / "final.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    subject = resolve_subject(str(latest_checkpoint(run_dir / "checkpoints")), None, None, cell.eval_overrides)
    row = {"cell": cell.name, **evaluate_subject(subject, 1.0)}
    if finetune_min:
        row |= finetune_cell(cell, run_dir, finetune_min)
    result_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value applied to every pre-training run")
    ap.add_argument("--budget-min", type=float, default=30.0, help="pre-training minutes per model")
    ap.add_argument("--curve-points", type=int, default=4, help="intermediate checkpoints per model")
    ap.add_argument("--train-fraction", type=float, default=0.2, help="per-class bank / probe fraction of the curve")
    ap.add_argument("--finetune-min", type=float, default=10.0, help="fine-tuning minutes of each final encoder")
    ap.add_argument("--only", default="", help="run only the models whose name contains this text")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th model starting at the K-th (0-based)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="runs/teacher_student")
    args = ap.parse_intermixed_args()
    shard, shards = map(int, args.shard.split("/"))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# teacher-student: {platform.node()} ({cpu_flags()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    models = [m for m in MODELS if args.only in m.name]
    for cell in models[shard::shards]:
        knn_curve(cell, out, args.budget_min, args.train_fraction, args.curve_points, args.overrides)
        print(json.dumps(final_row(cell, out, args.finetune_min)), flush=True)
    if args.only or shards > 1:
        return
    curves = {m.name: knn_curve(m, out, args.budget_min, args.train_fraction, args.curve_points, args.overrides)
              for m in models}
    finals = [final_row(m, out, args.finetune_min) for m in models]
    cells = {m.name: json.loads((cell_dir(out, m) / "cell.json").read_text()) for m in models}
    pixels = evaluate_subject(resolve_subject(None, "pixels", "mae_fmnist", []), 1.0)
    print(f"\n# {args.budget_min:g} one-core minutes of pre-training each; full protocol (whole train split as "
          f"bank and probe set, full test set); fine-tuning {args.finetune_min:g} minutes")
    print(markdown_table(
        ["model", "steps", "epochs", "train img/s", "kNN k=20", "kNN k=200", "linear probe", "fine-tune"],
        [[r["cell"], cells[r["cell"]]["steps"], cells[r["cell"]]["epochs"], round(cells[r["cell"]]["img_per_s"]),
          r["knn20"], r["knn200"], r["linprobe"], r.get("finetune", "-")] for r in finals]
        + [["raw pixels", "-", "-", "-", pixels["knn20"], pixels["knn200"], pixels["linprobe"], "-"]]))
    print(f"\n# the curve: every checkpoint, {args.train_fraction:.0%} bank / probe set")
    print(markdown_table(["model", "step", "pre-train min", "kNN k=20", "kNN k=200", "linear probe"],
                         [[r["cell"], r["step"], r["minutes"], r["knn20"], r["knn200"], r["linprobe"]]
                          for rows in curves.values() for r in rows]))
    print("\n# pre-training minutes until the first checkpoint beats raw pixels (same 20 % protocol; - : never)")
    px = evaluate_subject(resolve_subject(None, "pixels", "mae_fmnist", []), args.train_fraction)
    print(markdown_table(["model", f"kNN k=20 > {px['knn20']:.2f}", f"linear probe > {px['linprobe']:.2f}"],
                         [[name, first_minutes_at(rows, "knn20", px["knn20"] + 1e-9) or "-",
                           first_minutes_at(rows, "linprobe", px["linprobe"] + 1e-9) or "-"]
                          for name, rows in curves.items()]))
    png = save_accuracy_curves(curves, out / "accuracy_vs_minutes.png",
                               f"{args.budget_min:g} one-core minutes, {args.train_fraction:.0%} bank")
    print(f"\n# figure: {png}")
    print("\n" + resources_table(measure_configs([m.config for m in models], batch=64)))


if __name__ == "__main__":
    main()
