"""Cells of the benchmark experiments: one pre-training run each, evaluated the same way.

A cell pre-trains for a fixed CPU budget (``train.budget_minutes``: the cosine schedule is fitted to
the time), is evaluated with the frozen-feature protocol of ``mimkit knn`` / ``mimkit linprobe`` and
optionally fine-tuned; its row is written as ``cell.json`` in its folder, so an interrupted
experiment continues where it stopped. Used by ``bench_cvt_mae.py`` and ``bench_teacher_student.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import checkpoint_minutes, evaluate_subject, markdown_table, measure_img_per_s

from mimkit.config import load_config, resolve_config_path
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import list_checkpoints, load_state
from mimkit.engine.logging import read_metrics
from mimkit.engine.run_folder import CONFIG_FILE
from mimkit.evaluation.finetune import RESULT_FILE, finetune_config, finished_checkpoint, run_finetune
from mimkit.evaluation.resources import cpu_flags
from mimkit.evaluation.runner import resolve_subject


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
