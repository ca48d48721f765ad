"""The hybrid CvT-MAE's experiments on Fashion-MNIST at an equal CPU budget.

The experiments of "MAE-based Hybrid Convolutional ViT for Self-Supervised Learning" (skip and
update-mask ablation, patch and mask size sensitivity, small-crop pre-training, resources), at a
CPU's scale. Each experiment is a list of cells; every cell pre-trains for the same
``--budget-min`` minutes (``train.budget_minutes``: the cosine schedule is fitted to the time) and
is then evaluated with the frozen-feature protocol of ``mimkit knn`` / ``mimkit linprobe`` and,
with ``--finetune-min``, by fine-tuning it for that many minutes (``mimkit finetune``, layer decay
0.9). ``--seeds`` repeats every cell with other seeds (initialisation, masks, crops and data order)
and adds a table of mean and standard deviation over them. Cells whose results exist are not
re-run, so an interrupted experiment continues where it stopped.

    ablation     skip x update mask (2 x 2) on the CvT-MAE config ``--cvt-config``
    placement    skip x update-mask placement (none, pre_norm, post_norm): the ablation with a true control
    decoder      skip x decoder depth (1, 2 blocks per stage)
    recipe       mask ratio, loss and learning rate of the CvT-MAE config ``--cvt-config``, one at a time
    sparse       dense against sparse (method.sparse): the config as packaged, its tokens made visible by
                 their own cell (method.propagate=cell, still dense), sparse with cell, and sparse with a
                 1x1 decoder fusion (method.decoder_fuse_kernel=1): the price of the saving in accuracy
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
import time
from pathlib import Path

import torch
from cells import Cell, knn_curve, parse_shard, run_cell, seed_summary
from common import markdown_table

from mimkit.evaluation.resources import cpu_flags, measure_configs, resources_table
from mimkit.viz import first_minutes_at, save_accuracy_curves

CVT, VIT = "cvt_mae_fmnist", "mae_fmnist"
# CvT configs with token strides 2 and 4 (the CvT counterpart of a ViT patch size).
CVT_STRIDE = {2: CVT, 4: f"{CVT}_s4"}


#: The experiments that vary one CvT-MAE config by overrides (:func:`cvt_cells`).
VARIED = ("ablation", "placement", "decoder", "recipe", "sparse")


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
    if experiment == "sparse":  # what the sparse mode's parts cost in accuracy, one at a time
        cell = ["method.propagate=cell"]
        return [Cell("cvt dense", cvt), Cell("cvt dense, propagate=cell", cvt, cell),
                Cell("cvt sparse, propagate=cell", cvt, [*cell, "method.sparse=true"]),
                Cell("cvt sparse, propagate=cell, decoder_fuse_kernel=1", cvt,
                     [*cell, "method.sparse=true", "method.decoder_fuse_kernel=1"])]
    if experiment == "decoder":  # the hybrid CvT-MAE paper's decoder has two blocks per stage; packaged: one
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=[*VARIED, *EXPERIMENTS, "resources"])
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
    shard, shards = parse_shard(ap, args.shard)
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
                 if args.experiment in VARIED
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
