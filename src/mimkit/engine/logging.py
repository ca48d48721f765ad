"""Run logs: TensorBoard, a JSONL metrics file and a text log, written by rank 0 only."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Append scalars to ``metrics.jsonl`` and TensorBoard in the run folder.

    Args:
        run_dir: The run folder.
        enabled: False on every rank but 0 (all calls become no-ops).
        tensorboard: Also write TensorBoard event files.

    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None, wandb_project: str = "", config: dict[str, Any] | None = None) -> None:
        """Open the files (only when ``enabled``); TensorBoard drops its events from ``purge_step`` on.

        With ``wandb_project`` the TensorBoard scalars are mirrored to Weights & Biases (``config``
        as the W&B run's config); a run folder is always the same W&B run, so a continuation goes on in it.
        """
        self.enabled = enabled
        self._writer = None
        self._file = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        if wandb_project:
            import wandb  # the optional extra; the trainer checks it is there before the run starts

            # Before the SummaryWriter exists: sync_tensorboard patches TensorBoard's writer.
            self._wandb = wandb.init(project=wandb_project, name=run_dir.name, id=wandb_run_id(run_dir),
                                     resume="allow", dir=str(run_dir), config=config or {}, sync_tensorboard=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("mimkit").addHandler(handler)
        self._handler = handler

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        """Record ``values`` at ``step`` (floats go to TensorBoard as ``prefix/key``)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        logging.getLogger("mimkit").removeHandler(self._handler)
        self._handler.close()


def wandb_run_id(run_dir: Path) -> str:
    """The Weights & Biases run id of a run folder: its name and a hash of its absolute path (the same on
    every continuation).
    """
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(run_dir).resolve().name)
    return f"{safe[:40]}-{digest}"


def truncate_metrics(run_dir: Path, last_step: int) -> int:
    """Keep only the rows of ``metrics.jsonl`` up to ``last_step`` (a resumed run redoes the rest).

    Returns:
        How many rows were dropped.

    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()  # a damaged line is then not a row
    # A torn last line from a killed run, or a line that is not a row, is dropped with the redone steps.
    keep = [line for line in lines if (row := _row(line)) is not None and row["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)
    return len(lines) - len(keep)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (a torn last line from a killed run, or a line that is not a
    row with an integer ``step``, is ignored).
    """
    rows = []
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        row = _row(line)
        if row is not None:
            rows.append(row)
    return rows


def _row(line: str) -> dict[str, Any] | None:
    """A line of ``metrics.jsonl`` as a row: a mapping with an integer ``step``; None for anything else."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
        return row
    return None
