"""The hybrid CvT-MAE's experiments (source document 000) on Fashion-MNIST at an equal CPU budget.

Each experiment is a list of cells; every cell pre-trains for the same ``--budget-min`` minutes
(``train.budget_minutes``: the cosine schedule is fitted to the time) and is then evaluated with
the frozen-feature protocol of ``mimkit knn`` / ``mimkit linprobe`` and, with ``--finetune-min``,
by fine-tuning it for that many minutes (``mimkit finetune``, layer decay 0.9). ``--seeds`` repeats
every cell with other seeds (initialisation, masks, crops and data order) and adds a table of
mean and standard deviation over them. Cells whose results exist are not re-run, so an interrupted
experiment continues where it stopped.

    ablation     skip x update mask (2 x 2) on the CvT-MAE config ``--cvt-config``
    placement    skip x update-mask placement (none, pre_norm, post_norm): the ablation with a true control
    decoder      skip x decoder depth (1, 2 blocks per stage)
    recipe       mask ratio, loss and learning rate of the CvT-MAE config ``--cvt-config``, one at a time
    sensitivity  patch size x mask size, ViT-MAE against CvT-MAE
    small_crop   pre-train on random crops at half resolution, evaluate at full resolution
    resources    parameters, FLOPs, peak memory and images/s of CvT-MAE against ViT-MAE, and the kNN
                 accuracy of each against pre-training minutes (which reaches a given accuracy first)

Usage:
    python benchmarks/bench_cvt_mae.py ablation --budget-min 8 --out runs/exp
    python benchmarks/bench_cvt_mae.py placement --cvt-config cvt_mae_fmnist_s4 --budget-min 12 \
        --finetune-min 4 --seeds 0 1 2 --threads 1 --shard 0/2     # and --shard 1/2 beside it

Cells can run side by side, one core each, which also exposes them to the same drift of a shared
host's speed: ``--threads 1 --shard 0/2`` in one shell and ``--threads 1 --shard 1/2`` in another
(or ``--only vit`` / ``--only cvt``; cells are separate folders, so two processes never write the
same one). A last call without ``--shard`` or ``--only`` reads the finished cells and prints the
whole table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import checkpoint_minutes, evaluate_subject, markdown_table, measure_img_per_s

from mimkit.config import load_config, resolve_config_path
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import list_checkpoints, load_state
from mimkit.engine.logging import read_metrics
from mimkit.engine.run_folder import CONFIG_FILE
from mimkit.evaluation.finetune import RESULT_FILE, finetune_config, finished_checkpoint, run_finetune
from mimkit.evaluation.resources import cpu_flags, measure_configs, resources_table
from mimkit.evaluation.runner import resolve_subject
from mimkit.viz import first_minutes_at, save_accuracy_curves


@dataclass
class Cell:
    """One pre-training run of an experiment and how it is evaluated."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def label(self) -> str:
        """The cell's name with its seed (seed 0, the configs' own, is left unsaid)."""
        return f"{self.name} seed={self.seed}" if self.seed else self.name


CVT, VIT = "cvt_mae_fmnist", "mae_fmnist"
# CvT configs with token strides 2 and 4 (the CvT counterpart of a ViT patch size).
CVT_STRIDE = {2: CVT, 4: f"{CVT}_s4"}


def cvt_cells(experiment: str, cvt: str) -> list[Cell]:
    """The cells of the experiments that vary one CvT-MAE config (``cvt``) by overrides.

    For ``cvt_mae_fmnist`` the ablation cells equal the packaged ``cvt_mae_fmnist_no_skip`` etc.
    """
    if experiment == "ablation":
        return [Cell(f"cvt skip={s} update_mask={u}", cvt, [f"method.skip={s}", f"method.update_mask={u}"])
                for s in ("true", "false") for u in ("true", "false")]
    if experiment == "placement":  # the ablation with a true control: where the update mask acts
        return [Cell(f"cvt skip={s} update_mask={u}", cvt, [f"method.skip={s}", f"method.update_mask={u}"])
                for s in ("true", "false") for u in ("none", "pre_norm", "post_norm")]
    if experiment == "decoder":  # the source's decoder has two blocks per stage, the packaged one
        return [Cell(f"cvt skip={s} decoder_depth={d}", cvt, [f"method.skip={s}", f"method.decoder_depth={d}"])
                for s in ("true", "false") for d in (1, 2)]
    # recipe: the config as packaged, then one change at a time
    return [Cell("cvt as packaged", cvt), Cell("cvt mask_ratio=0.75", cvt, ["method.mask_ratio=0.75"]),
            Cell("cvt loss=mae", cvt, ["method.loss=mae"]), Cell("cvt base_lr=2e-3", cvt, ["optim.base_lr=2e-3"])]


EXPERIMENTS: dict[str, list[Cell]] = {
    "sensitivity": [
        *[Cell(f"vit patch={p} (mask {p}x{p})", VIT, [f"backbone.patch_size={p}"]) for p in (2, 4, 7)],
        *[Cell(f"cvt stride={s} mask={m}x{m}", CVT_STRIDE[s], [f"method.mask_size={m}"])
          for s in (2, 4) for m in (2, 4, 7)],
    ],
    "small_crop": [
        Cell("cvt pre-train 28 px, eval 28 px", CVT),
        Cell("cvt pre-train 14 px crops, eval 28 px", CVT, ["data.img_size=14", "method.mask_size=2"],
             ["data.img_size=28"]),
        Cell("vit pre-train 28 px, eval 28 px", VIT),
        Cell("vit pre-train 16 px crops, eval 28 px", VIT, ["data.img_size=16"], ["data.img_size=28"]),
    ],
}


def cell_dir(out: Path, cell: Cell) -> Path:
    """A file-system-safe folder name for a cell."""
    safe = "".join(c if c.isalnum() or c in "=." else "_" for c in cell.label)
    return out / safe


def finetune_cell(cell: Cell, run_dir: Path, minutes: float) -> dict:
    """Fine-tune a cell's encoder for ``minutes`` (resuming an interrupted run); its test top-1."""
    target = run_dir / "finetune"
    cfg = finetune_config(str(run_dir), "fmnist", [
        *cell.eval_overrides, f"run_dir={target}", "method.layer_decay=0.9", "train.epochs=1000",
        f"train.budget_minutes={minutes}", "train.progress=false", f"seed={cell.seed}"])
    if (target / CONFIG_FILE).is_file() and (target / "checkpoints").is_dir():
        done = finished_checkpoint(cfg) / RESULT_FILE
        if done.is_file():
            result = json.loads(done.read_text())
            return {"finetune": result["top1"], "finetune_steps": int(done.parent.name.split("_")[-1])}
    result, path, _ = run_finetune(cfg, resume="auto" if (target / CONFIG_FILE).is_file() else None)
    return {"finetune": result["top1"], "finetune_steps": int(path.parent.name.split("_")[-1])}


def run_cell(cell: Cell, out: Path, budget: float, train_fraction: float, extra: list[str],
             finetune_min: float = 0.0) -> dict:
    """Pre-train (unless done) and evaluate one cell; returns its result row."""
    run_dir = cell_dir(out, cell)
    result_file = run_dir / "cell.json"
    if result_file.is_file():
        row = json.loads(result_file.read_text())
        if finetune_min and "finetune" not in row:
            row |= finetune_cell(cell, run_dir, finetune_min)
            result_file.write_text(json.dumps(row, indent=2) + "\n")
        return row
    config = str(resolve_config_path(cell.config))
    over = [f"run_dir={run_dir}", *cell.overrides, "train.epochs=1000", f"train.budget_minutes={budget}",
            "train.progress=false", f"seed={cell.seed}", *extra]
    cfg = load_config(config, over)
    t0 = time.perf_counter()
    pretrain(cfg, resume="auto")
    wall = (time.perf_counter() - t0) / 60
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    timed = rows[1:] or rows  # the first window includes start-up; left out when there are others
    subject = resolve_subject(str(run_dir), None, None, cell.eval_overrides)
    acc = evaluate_subject(subject, train_fraction)
    row = {"cell": cell.name, "seed": cell.seed, "host": cpu_flags(), "steps": rows[-1]["step"] if rows else 0,
           "epochs": round(rows[-1]["epoch"], 2) if rows else 0, "train_min": round(wall, 1),
           "img_per_s": round(sum(r["img_per_s"] for r in timed) / max(1, len(timed)), 1),
           "final_loss": rows[-1]["loss"] if rows else None,
           **acc, "params": sum(p.numel() for p in subject.encoder.parameters())}
    if finetune_min:
        row |= finetune_cell(cell, run_dir, finetune_min)
    result_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def seed_summary(rows: list[dict]) -> str:
    """Mean and sample standard deviation of each cell's accuracies over its seeds, as a table."""
    keys = [k for k in ("knn20", "knn200", "linprobe", "finetune") if any(k in r for r in rows)]
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(r["cell"], []).append(r)

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.2f}{sd}"

    names = {"knn20": "kNN k=20", "knn200": "kNN k=200", "linprobe": "linear probe", "finetune": "fine-tune"}
    return markdown_table(["cell", "seeds", *[names[k] for k in keys]],
                          [[name, len(rs), *[spread([r[k] for r in rs if k in r]) for k in keys]]
                           for name, rs in cells.items()])


def knn_curve(cell: Cell, out: Path, budget: float, train_fraction: float, points: int, extra: list[str]) -> list[dict]:
    """Pre-train one cell with ``points`` evenly spaced checkpoints; kNN accuracy of each against minutes."""
    run_dir = cell_dir(out, cell)
    result_file = run_dir / "curve.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    config = str(resolve_config_path(cell.config))
    cfg = load_config(config, [f"run_dir={run_dir}", *cell.overrides, *extra])
    # Checkpoint spacing only: the schedule itself is fitted to the budget as the run goes.
    steps_est = budget * 60 * measure_img_per_s(cfg) / cfg.optim.batch_size
    every = max(1, int(steps_est / (points + 1)))
    run_cell(cell, out, budget, train_fraction, [*extra, f"train.ckpt_every_steps={every}", "train.keep_last=0"])
    rows = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        subject = resolve_subject(str(ckpt), None, None, cell.eval_overrides)
        acc = evaluate_subject(subject, train_fraction)
        rows.append({"cell": cell.name, "step": load_state(ckpt)["step"],
                     "minutes": round(checkpoint_minutes(ckpt, run_dir), 2), **acc})
        print(json.dumps(rows[-1]), flush=True)
    result_file.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["ablation", "placement", "decoder", "recipe", *EXPERIMENTS, "resources"])
    ap.add_argument("overrides", nargs="*", help="key=value applied to every cell")
    ap.add_argument("--budget-min", type=float, default=8.0, help="pre-training minutes per cell")
    ap.add_argument("--train-fraction", type=float, default=0.2,
                    help="per-class fraction of the train split used as kNN bank / probe training set")
    ap.add_argument("--out", default="runs/cvt_experiments")
    ap.add_argument("--curve-points", type=int, default=3, help="resources: intermediate checkpoints per model")
    ap.add_argument("--reach-knn", type=float, nargs="*", default=[74, 76, 78, 80],
                    help="resources: kNN k=20 accuracies whose time to reach is tabulated")
    ap.add_argument("--reach-linprobe", type=float, nargs="*", default=[80, 82, 83, 84],
                    help="resources: linear-probe accuracies whose time to reach is tabulated")
    ap.add_argument("--vit-config", default=VIT, help="resources: the ViT-MAE config")
    ap.add_argument("--cvt-config", default=CVT, help="resources, ablation, recipe: the CvT-MAE config")
    ap.add_argument("--only", default="", help="run only the cells whose name contains this text")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th cell starting at the K-th (0-based)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="run every cell with each of these seeds (all cells of a seed before the next seed)")
    ap.add_argument("--finetune-min", type=float, default=0.0,
                    help="also fine-tune each cell's encoder for this many minutes (0: no fine-tuning)")
    args = ap.parse_intermixed_args()
    try:
        shard, shards = map(int, args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        ap.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {args.experiment}: {platform.node()} ({cpu_flags()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.experiment == "resources":
        models = [Cell(name, config) for name, config in (("vit-mae", args.vit_config), ("cvt-mae", args.cvt_config))
                  if args.only in name]
        curves = [knn_curve(cell, out, args.budget_min, args.train_fraction, args.curve_points, args.overrides)
                  for cell in models[shard::shards]]
        if args.only or shards > 1:
            return
        print(markdown_table(["model", "step", "pre-train min", "kNN k=20", "kNN k=200", "linear probe"],
                             [[r["cell"], r["step"], r["minutes"], r["knn20"], r["knn200"], r["linprobe"]]
                              for rows in curves for r in rows]))
        by_model = {cell.name: rows for cell, rows in zip(models, curves, strict=True)}
        reach = [(key, t) for key, targets in (("knn20", args.reach_knn), ("linprobe", args.reach_linprobe))
                 for t in targets]
        print("\n# pre-training minutes until the first checkpoint at or above an accuracy (- : never)")
        print(markdown_table(["accuracy", *by_model], [
            [f"{'kNN k=20' if key == 'knn20' else 'linear probe'} >= {t:g}",
             *[first_minutes_at(rows, key, t) or "-" for rows in by_model.values()]] for key, t in reach]))
        png = save_accuracy_curves(by_model, out / "accuracy_vs_minutes.png",
                                   f"{args.budget_min:g}-minute budget, {args.train_fraction:.0%} bank")
        print(f"\n# figure: {png}")
        # The same measurement as `mimkit resources`, each model in its own process.
        print("\n" + resources_table(measure_configs([args.vit_config, args.cvt_config], batch=64)))
        return
    rows = []
    all_cells = (cvt_cells(args.experiment, args.cvt_config)
                 if args.experiment in ("ablation", "placement", "decoder", "recipe")
                 else EXPERIMENTS[args.experiment])
    cells = [dataclasses.replace(c, seed=seed) for seed in args.seeds
             for c in all_cells if args.only in c.name][shard::shards]
    for cell in cells:
        rows.append(run_cell(cell, out, args.budget_min, args.train_fraction, args.overrides, args.finetune_min))
        print(json.dumps(rows[-1]), flush=True)
    tuned = any("finetune" in r for r in rows)
    print(f"\n# budget {args.budget_min} min per cell; kNN bank / probe set: {args.train_fraction:.0%} per class"
          + (f"; fine-tuning {args.finetune_min:g} min per cell" if tuned else ""))
    print(markdown_table(
        ["cell", "seed", "encoder params", "epochs", "img/s", "kNN k=20", "kNN k=200", "linear probe",
         *(["fine-tune", "fine-tune steps"] if tuned else [])],
        [[r["cell"], r.get("seed", 0), f"{r['params']:,}", r["epochs"], round(r["img_per_s"]), r["knn20"],
          r["knn200"], r["linprobe"], *([r.get("finetune", "-"), r.get("finetune_steps", "-")] if tuned else [])]
         for r in rows]))
    if len(args.seeds) > 1:
        print(f"\n# mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}")
        print(seed_summary(rows))


if __name__ == "__main__":
    main()
