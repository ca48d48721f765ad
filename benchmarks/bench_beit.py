"""BEiT with each kind of tokenizer, beside MAE and data2vec 2.0, at an equal CPU budget that counts the tokenizer.

A BEiT model is a chain of runs: its tokenizer (and, for VQ-KD, the teacher run the tokenizer learns
from), then BEiT itself, named to the tokenizer with ``method.tokenizer``. Every run of a chain is
charged to the same ``--budget-min``: each earlier stage trains for its own minutes and BEiT for the
rest, so the curve of accuracy against minutes starts where the chain's earlier stages ended. The
last run of every chain is evaluated as ``bench_data2vec.py`` does (a curve of ``--curve-points``
checkpoints on a ``--train-fraction`` bank, then kNN k=20/200 and the linear probe on the whole
train split, and a ``--finetune-min`` fine-tune); every tokenizer's codebook usage is counted on the
whole train split (codes given to at least one patch, and the perplexity of their frequencies).

    BEiT + VQ-VAE     vqvae_fmnist for --tokenizer-min, then beit_fmnist
    BEiT + k-means    patch_kmeans_fmnist for --kmeans-min, then beit_fmnist (CCViT's codebook)
    BEiT + VQ-KD      data2vec2_fmnist for --teacher-min, vqkd_fmnist for --tokenizer-min, then beit_fmnist
    MAE               mae_fmnist for the whole budget
    data2vec 2.0      data2vec2_fmnist for the whole budget

``--tokenizers-only`` trains the earlier stages alone and prints every tokenizer's codebook usage, so
that a codebook that collapses is seen before the whole budget is spent.

Usage (two chains side by side, one core each, then a last call for the tables and the figure):
    python benchmarks/bench_beit.py --budget-min 30 --threads 1 --shard 0/2 --out RUNS
    python benchmarks/bench_beit.py --budget-min 30 --threads 1 --shard 1/2 --out RUNS
    python benchmarks/bench_beit.py --budget-min 30 --out RUNS
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from cells import Cell, cell_dir, final_row, knn_curve, random_init_rows, run_cell, start_cells
from common import evaluate_subject, markdown_table

from mimkit.config import load_yaml, resolve_config_path
from mimkit.data import build_dataset, build_loader
from mimkit.engine.checkpoint import load_weights, resolve_checkpoint
from mimkit.engine.continuation import run_settings
from mimkit.evaluation.resources import measure_configs, resources_table
from mimkit.evaluation.runner import resolve_subject
from mimkit.methods.quantizer import perplexity
from mimkit.models import method_from_config
from mimkit.viz import save_accuracy_curves


@dataclass(frozen=True)
class Stage:
    """One run of a chain: a cell and its minutes (0: what is left of the budget)."""

    cell: Cell
    minutes_key: str = ""


@dataclass(frozen=True)
class Chain:
    """A model as runs in order; each later one names the run before it (``{prev}`` in an override)."""

    name: str
    stages: tuple[Stage, ...]


def chains(seed: int) -> list[Chain]:
    """The compared models (a stage's override ``{prev}`` becomes the previous stage's run folder)."""
    def c(name: str, config: str, *overrides: str) -> Cell:
        return Cell(name, config, list(overrides), seed=seed)

    return [
        Chain("BEiT + VQ-VAE", (Stage(c("VQ-VAE tokenizer", "vqvae_fmnist"), "tokenizer_min"),
                                Stage(c("BEiT + VQ-VAE", "beit_fmnist", "method.tokenizer={prev}")))),
        Chain("BEiT + k-means", (Stage(c("k-means tokenizer", "patch_kmeans_fmnist"), "kmeans_min"),
                                 Stage(c("BEiT + k-means", "beit_fmnist", "method.tokenizer={prev}")))),
        Chain("BEiT + VQ-KD", (Stage(c("VQ-KD teacher (data2vec 2.0)", "data2vec2_fmnist"), "teacher_min"),
                               Stage(c("VQ-KD tokenizer", "vqkd_fmnist", "method.teacher={prev}"), "tokenizer_min"),
                               Stage(c("BEiT + VQ-KD", "beit_fmnist", "method.tokenizer={prev}")))),
        Chain("MAE", (Stage(c("MAE", "mae_fmnist")),)),
        Chain("data2vec 2.0", (Stage(c("data2vec 2.0", "data2vec2_fmnist")),)),
    ]


def resolved(chain: Chain, out: Path, args: argparse.Namespace) -> list[tuple[Cell, float, float]]:
    """Each stage's cell with ``{prev}`` filled in, its minutes, and the minutes spent before it."""
    rows, spent, prev = [], 0.0, ""
    for stage in chain.stages:
        minutes = getattr(args, stage.minutes_key) if stage.minutes_key else args.budget_min - spent
        if minutes <= 0:
            raise SystemExit(f"{chain.name}: the earlier stages take the whole --budget-min {args.budget_min:g}")
        cell = replace(stage.cell, overrides=[o.replace("{prev}", prev) for o in stage.cell.overrides])
        rows.append((cell, minutes, spent))
        spent += minutes
        prev = str(cell_dir(out, cell))
    return rows


@torch.no_grad()
def codebook_usage(run_dir: Path) -> dict[str, float]:
    """The tokenizer run's codes on the whole train split (no augmentation): the share of codes given to
    at least one patch, and the perplexity of their frequencies (K when every code is used equally)."""
    cfg = run_settings(run_dir)
    method = method_from_config(cfg).eval()
    load_weights(method, resolve_checkpoint(run_dir))
    data = replace(cfg.data, subset_fraction=1.0)
    counts = torch.zeros(method.cfg.num_codes, dtype=torch.long)
    for batch in build_loader(build_dataset(data, "train"), data, 512, train=False):
        counts += torch.bincount(method.tokenize(batch.images).flatten(), minlength=counts.numel())
    return {"usage": round(float((counts > 0).float().mean()), 4), "perplexity": round(perplexity(counts), 1)}


def run_earlier(stages: list[tuple[Cell, float, float]], out: Path, args: argparse.Namespace) -> list[dict]:
    """The stages before a chain's last, trained and scored in order, with each tokenizer's codebook usage."""
    earlier = []
    for cell, minutes, spent in stages:
        row = run_cell(cell, out, minutes, args.train_fraction, [])
        if load_yaml(resolve_config_path(cell.config))["method"]["name"] == "vqvae":
            usage_file = cell_dir(out, cell) / "usage.json"
            if not usage_file.is_file():
                usage_file.write_text(json.dumps(codebook_usage(cell_dir(out, cell))) + "\n")
            row |= json.loads(usage_file.read_text())
        earlier.append(row | {"minutes": minutes, "from_min": spent})
        print(json.dumps(earlier[-1]), flush=True)
    return earlier


def run_chain(chain: Chain, out: Path, args: argparse.Namespace) -> dict:
    """Every stage in order (the earlier ones trained and scored, the last with a curve); its rows."""
    stages = resolved(chain, out, args)
    earlier = run_earlier(stages[:-1], out, args)
    last, minutes, spent = stages[-1]
    curve = knn_curve(last, out, minutes, args.train_fraction, args.curve_points, [])
    curve = [r | {"minutes": round(r["minutes"] + spent, 2)} for r in curve]
    final = final_row(last, out, args.finetune_min)
    cell = json.loads((cell_dir(out, last) / "cell.json").read_text())
    return {"chain": chain.name, "earlier": earlier, "curve": curve, "final": final, "cell": cell, "spent": spent,
            "run": str(cell_dir(out, last))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=30.0, help="one-core minutes per model, every stage")
    ap.add_argument("--tokenizer-min", type=float, default=5.0, help="minutes of a VQ-VAE or VQ-KD tokenizer")
    ap.add_argument("--kmeans-min", type=float, default=1.0, help="minutes of the k-means tokenizer")
    ap.add_argument("--teacher-min", type=float, default=10.0, help="minutes of VQ-KD's teacher run")
    ap.add_argument("--curve-points", type=int, default=2, help="intermediate checkpoints of each model's last run")
    ap.add_argument("--train-fraction", type=float, default=0.2, help="per-class bank / probe fraction of the curve")
    ap.add_argument("--finetune-min", type=float, default=10.0, help="fine-tuning minutes of each final encoder")
    ap.add_argument("--only", default="", help="run only the models whose name contains this text")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (0: the configs' own)")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th model starting at the K-th (0-based)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tokenizers-only", action="store_true",
                    help="train the chains' earlier stages only and print their codebook usage (a check "
                         "before the whole budget is spent)")
    ap.add_argument("--no-floors", action="store_true",
                    help="leave the untrained encoders and raw pixels out of the last call's table (each a "
                         "full-protocol evaluation of minutes)")
    ap.add_argument("--out", default="runs/beit")
    args = ap.parse_args()
    shard, shards, out = start_cells(ap, args, __doc__)
    models = [c for c in chains(args.seed) if args.only in c.name]
    if not models:
        ap.error(f"--only {args.only!r} picks no model; the models: {'; '.join(c.name for c in chains(0))}")
    if args.tokenizers_only:
        rows = [r | {"chain": c.name} for c in models[shard::shards] for r in run_earlier(resolved(c, out, args)[:-1],
                                                                                          out, args)]
        print("\n" + markdown_table(["chain", "stage", "minutes", "steps", "codebook usage", "perplexity"],
                                    [[r["chain"], r["cell"], r["minutes"], r["steps"],
                                      f"{r['usage']:.1%}" if "usage" in r else "-", r.get("perplexity", "-")]
                                     for r in rows]))
        return
    results = [run_chain(c, out, args) for c in models[shard::shards]]
    if shards > 1:
        return
    floors = [] if args.no_floors else [[row[0], "-", "-", "-", *row[4:7], "-", "-"] for row in random_init_rows(
        [Cell(r["chain"], str(Path(r["run"]) / "config.yaml")) for r in results])]
    print(f"\n# {args.budget_min:g} one-core minutes per model, every stage counted; full protocol (whole train "
          f"split as bank and probe set, full test set); fine-tuning {args.finetune_min:g} minutes")
    print(markdown_table(
        ["model", "earlier stages (min)", "steps", "train img/s", "kNN k=20", "kNN k=200", "linear probe",
         "fine-tune", "codebook usage (perplexity)"],
        [[r["chain"], " + ".join(f"{e['cell']} {e['minutes']:g}" for e in r["earlier"]) or "-", r["cell"]["steps"],
          round(r["cell"]["img_per_s"]), r["final"]["knn20"], r["final"]["knn200"], r["final"]["linprobe"],
          r["final"].get("finetune", "-"),
          next((f"{e['usage']:.1%} ({e['perplexity']:g})" for e in r["earlier"] if "usage" in e), "-")]
         for r in results] + floors))
    if not args.no_floors:
        pixels = evaluate_subject(resolve_subject(None, "pixels", str(resolve_config_path("mae_fmnist")), []), 1.0)
        print(f"\nraw pixels: {pixels['knn20']:.2f} / {pixels['knn200']:.2f} / {pixels['linprobe']:.2f}")
    print(f"\n# the curve ({args.train_fraction:.0%} bank / probe set): minutes from the chain's start")
    print(markdown_table(["model", "step", "minutes", "kNN k=20", "kNN k=200", "linear probe"],
                         [[r["chain"], c["step"], c["minutes"], c["knn20"], c["knn200"], c["linprobe"]]
                          for r in results for c in r["curve"]]))
    png = save_accuracy_curves({r["chain"]: r["curve"] for r in results}, out / "accuracy_vs_minutes.png",
                               f"{args.budget_min:g} one-core minutes, tokenizers counted, "
                               f"{args.train_fraction:.0%} bank")
    print(f"\n# figure: {png}")
    # Each run as it trained (its own config.yaml, which records the tokenizer BEiT was built with).
    runs = list(dict.fromkeys([*(str(cell_dir(out, c) / "config.yaml") for r in results for c in
                                 [Cell(e["cell"], "", seed=args.seed) for e in r["earlier"]]),
                               *(str(Path(r["run"]) / "config.yaml") for r in results)]))
    print("\n" + resources_table(measure_configs(runs, batch=64)))


if __name__ == "__main__":
    main()
