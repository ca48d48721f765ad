"""Cells of the benchmark experiments: one pre-training run each, evaluated the same way.

A cell pre-trains for a fixed CPU budget (``train.budget_minutes``: the cosine schedule is fitted to
the time), is evaluated with the frozen-feature protocol of ``mimkit knn`` / ``mimkit linprobe`` and
optionally fine-tuned; its row is written as ``cell.json`` in its folder, so an interrupted
experiment continues where it stopped. Used by ``bench_cvt_mae.py``; :func:`budget_comparison` is
the whole equal-budget comparison of ``bench_teacher_student.py`` and ``bench_mixing.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from common import checkpoint_minutes, evaluate_subject, markdown_table, measure_img_per_s

from mimkit.config import resolve_config_path
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import latest_checkpoint, list_checkpoints, load_state
from mimkit.engine.logging import read_metrics
from mimkit.engine.run_folder import CONFIG_FILE
from mimkit.evaluation.finetune import RESULT_FILE, finetune_config, finished_checkpoint, run_finetune
from mimkit.evaluation.resources import cpu_flags, measure_configs, resources_table
from mimkit.evaluation.runner import resolve_subject
from mimkit.models import load_config
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




def crop(low: float) -> str:
    """The override of a single view cropping ``low``-100 % of the image, flipped half the time."""
    return f"method.views=[{{scale: [{low}, 1.0], hflip: 0.5}}]"


#: The override of a single view of the whole image, flipped half the time (the stride-4 CvT-MAE's own
#: since section 24 of BENCHMARKS.md).
NO_CROP = "method.views=[{scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip: 0.5}]"

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


def picks(text: str, name: str, models: list[Cell]) -> bool:
    """Whether ``--only``'s ``text`` picks the model ``name`` (see the option's help)."""
    names = [m.name for m in models]
    if text in names:
        return text == name
    if any(text in n for n in names):
        return text in name
    return "," in text and any(picks(part.strip(), name, models) for part in text.split(",") if part.strip())


def parse_shard(ap: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """``--shard K/N`` as ``(K, N)``; anything else is an argparse error naming the valid form."""
    try:
        shard, shards = map(int, text.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        ap.error(f"--shard must be K/N with 0 <= K < N, got {text!r}")
    return shard, shards


def start_cells(ap: argparse.ArgumentParser, args: argparse.Namespace, doc: str) -> tuple[int, int, Path]:
    """``--shard``, ``--threads`` and ``--out`` of a cell experiment applied, and its header printed.

    Returns:
        ``(shard, shards, out)``: the parsed ``--shard`` and the output folder, created.

    """
    shard, shards = parse_shard(ap, args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {doc.splitlines()[0]}\n# {platform.node()} ({cpu_flags()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    return shard, shards, out


def final_row(cell: Cell, out: Path, finetune_min: float) -> dict:
    """The last checkpoint under the full protocol, and its fine-tuning (written once, then read; a
    later call with ``finetune_min`` fine-tunes an encoder evaluated without)."""
    run_dir = cell_dir(out, cell)
    result_file = run_dir / "final.json"
    if result_file.is_file():
        row = json.loads(result_file.read_text())
        if not finetune_min or "finetune" in row:
            return row
    else:
        subject = resolve_subject(str(latest_checkpoint(run_dir / "checkpoints")), None, None, cell.eval_overrides)
        row = {"cell": cell.name, "seed": cell.seed, **evaluate_subject(subject, 1.0)}
    if finetune_min:
        row |= finetune_cell(cell, run_dir, finetune_min)
    result_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def random_init_rows(models: list[Cell]) -> list[list[object]]:
    """The full-protocol rows of each distinct backbone of ``models``, untrained (``--baseline random``).

    The floor a pre-trained encoder must rise above: on 28 px Fashion-MNIST an untrained CvT is
    within a few points of raw pixels.
    """
    seen: dict[str, tuple[Cell, dict]] = {}
    for m in models:
        cfg = load_config(resolve_config_path(m.config), m.overrides)
        # stochastic depth changes training only: an untrained encoder is the same with any rate
        backbone = {k: v for k, v in cfg.backbone.items() if k != "drop_path_rate"}
        key = json.dumps([backbone, cfg.data.img_size, cfg.data.channels, m.eval_overrides], sort_keys=True)
        seen.setdefault(key, (m, cfg.backbone))
    rows = []
    for m, backbone in seen.values():
        config = str(resolve_config_path(m.config))
        overrides = [o for o in m.overrides if o.startswith("backbone.")] + m.eval_overrides
        acc = evaluate_subject(resolve_subject(None, "random", config, overrides), 1.0)
        pool = backbone.get("global_pool")
        rows.append([f"random-init {backbone['name']}" + (f" ({pool} pool)" if pool else ""), "-", "-", "-",
                     acc["knn20"], acc["knn200"], acc["linprobe"]])
    return rows


def budget_comparison(doc: str, models: list[Cell], default_out: str,
                      extra: Callable[[Cell, Path], dict[str, str]] | None = None) -> None:
    """The equal-budget comparison as a command: curves, full-protocol table, fine-tuning, resources.

    Each model pre-trains for ``--budget-min`` minutes with ``--curve-points`` checkpoints, each
    probed on a ``--train-fraction`` bank (the curve of accuracy against minutes); the last one is
    evaluated with the full protocol beside raw pixels and fine-tuned for ``--finetune-min``
    minutes; ``mimkit resources`` measures every config in its own process. ``--seeds`` repeats
    every model with other seeds and adds their mean and spread. ``--shard K/N`` runs every N-th
    run (side by side, one core each); the call without it prints the tables (of the ``--only``
    models, where given).

    Args:
        doc: The script's docstring (its first line is the command's description).
        models: The compared models.
        default_out: ``--out`` when not given.
        extra: Optional further columns of the final table, from a model's run folder.

    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value applied to every pre-training run")
    ap.add_argument("--budget-min", type=float, default=30.0, help="pre-training minutes per model")
    ap.add_argument("--curve-points", type=int, default=4, help="intermediate checkpoints per model")
    ap.add_argument("--train-fraction", type=float, default=0.2, help="per-class bank / probe fraction of the curve")
    ap.add_argument("--finetune-min", type=float, default=10.0, help="fine-tuning minutes of each final encoder")
    ap.add_argument("--only", nargs="+", default=[""], metavar="TEXT",
                    help="run and tabulate only the models whose name contains one of these texts; a text equal "
                         "to a name picks that model alone, and one that no name contains is split on commas "
                         "('iBOT,DINO')")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="repeat every model with these seeds (initialisation, masks, crops, data order; "
                         "0: the configs' own)")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th model starting at the K-th (0-based)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=default_out)
    args = ap.parse_intermixed_args()
    shard, shards, out = start_cells(ap, args, doc)
    if args.overrides:  # what every run was given beyond the budget (a fixed number of epochs, another precision)
        print(f"# every run: {' '.join(args.overrides)}", flush=True)
    # --only takes several texts, so a key=value after it would land there: a text must pick a model
    lost = [text for text in args.only if not any(picks(text, m.name, models) for m in models)]
    if lost:
        ap.error(f"--only {' '.join(map(repr, lost))} picks no model; the models: {'; '.join(m.name for m in models)}")
    models = [replace(m, seed=seed) for m in models if any(picks(text, m.name, models) for text in args.only)
              for seed in args.seeds]
    for cell in models[shard::shards]:
        knn_curve(cell, out, args.budget_min, args.train_fraction, args.curve_points, args.overrides)
        print(json.dumps(final_row(cell, out, args.finetune_min)), flush=True)
    if shards > 1:
        return
    # Keyed by label: a model's name with its seed.
    curves = {m.label: knn_curve(m, out, args.budget_min, args.train_fraction, args.curve_points, args.overrides)
              for m in models}
    finals = {m.label: final_row(m, out, args.finetune_min) for m in models}
    cells = {m.label: json.loads((cell_dir(out, m) / "cell.json").read_text()) for m in models}
    extras = {m.label: extra(m, cell_dir(out, m)) if extra else {} for m in models}
    extra_keys = sorted({k for row in extras.values() for k in row})
    pixels_config = str(resolve_config_path("mae_fmnist"))
    pixels = evaluate_subject(resolve_subject(None, "pixels", pixels_config, []), 1.0)
    randoms = random_init_rows(models)
    print(f"\n# {args.budget_min:g} one-core minutes of pre-training each; full protocol (whole train split as "
          f"bank and probe set, full test set); fine-tuning {args.finetune_min:g} minutes")
    print(markdown_table(
        ["model", "steps", "epochs", "train img/s", "kNN k=20", "kNN k=200", "linear probe", "fine-tune", *extra_keys],
        [[label, cells[label]["steps"], cells[label]["epochs"], round(cells[label]["img_per_s"]),
          r["knn20"], r["knn200"], r["linprobe"], r.get("finetune", "-"),
          *[extras[label].get(k, "-") for k in extra_keys]] for label, r in finals.items()]
        + [[*r, "-", *["-" for _ in extra_keys]] for r in randoms]
        + [["raw pixels", "-", "-", "-", pixels["knn20"], pixels["knn200"], pixels["linprobe"], "-",
            *["-" for _ in extra_keys]]]))
    print(f"\n# the curve: every checkpoint, {args.train_fraction:.0%} bank / probe set")
    print(markdown_table(["model", "step", "pre-train min", "kNN k=20", "kNN k=200", "linear probe"],
                         [[label, r["step"], r["minutes"], r["knn20"], r["knn200"], r["linprobe"]]
                          for label, rows in curves.items() for r in rows]))
    if len(args.seeds) > 1:
        print(f"\n# mean ± sample standard deviation over seeds {' '.join(map(str, args.seeds))}")
        print(seed_summary(list(finals.values())))
    print("\n# pre-training minutes until the first checkpoint beats raw pixels (same 20 % protocol; - : never)")
    px = evaluate_subject(resolve_subject(None, "pixels", pixels_config, []), args.train_fraction)
    print(markdown_table(["model", f"kNN k=20 > {px['knn20']:.2f}", f"linear probe > {px['linprobe']:.2f}"],
                         [[name, first_minutes_at(rows, "knn20", px["knn20"] + 1e-9) or "-",
                           first_minutes_at(rows, "linprobe", px["linprobe"] + 1e-9) or "-"]
                          for name, rows in curves.items()]))
    png = save_accuracy_curves(curves, out / "accuracy_vs_minutes.png",
                               f"{args.budget_min:g} one-core minutes, {args.train_fraction:.0%} bank")
    print(f"\n# figure: {png}")
    # The same measurement as `mimkit resources`, each config in its own process.
    print("\n" + resources_table(measure_configs(list(dict.fromkeys(m.config for m in models)), batch=64)))
