"""Opening a run folder: a fresh start, a replacement, or a continuation from a verified checkpoint.

Everything here is checked before the folder is written: the settings against the run's own (a
continuation under other settings is refused), the checkpoint (read, fitted to the model and the
optimizer in memory), and the folder (free, writable, room for a checkpoint). Only then is the folder
locked and prepared; the trainer applies the returned :class:`ResumePoint`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimkit.config import PretrainConfig, to_yaml
from mimkit.engine.checkpoint import (
    MODEL_FILE,
    checkpoint_step,
    list_checkpoints,
    load_state,
    read_weights,
    remove_temporaries,
    resolve_checkpoint,
    set_aside,
    weight_shapes,
)
from mimkit.engine.continuation import check_continuation, record_changes
from mimkit.engine.distributed import DistInfo, broadcast_from_main
from mimkit.engine.logging import RunLogger, truncate_metrics
from mimkit.engine.run_folder import CONFIG_FILE, RunFolder, reading_run, run_folder_of, write_text
from mimkit.errors import CheckpointError, CheckpointMismatchError, ConfigError, RunFolderError

log = logging.getLogger(__name__)

#: The training state a checkpoint must hold to be continued.
STATE_KEYS = ("optimizer", "step", "epoch", "batch_in_epoch", "rng")


@dataclass
class ResumePoint:
    """A checkpoint read and verified in memory, not yet applied to the model."""

    ckpt: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoints that could not be used, with the reason; renamed once the run is locked."""


@dataclass
class RunToOpen:
    """What opening a run needs from the trainer, built but not yet started."""

    cfg: PretrainConfig
    info: DistInfo
    folder: RunFolder
    method: torch.nn.Module
    new_optimizer: Callable[[], torch.optim.Optimizer]
    """A fresh optimizer of the method, to check a checkpoint's state against without touching the real one."""
    checkpoint_bytes: int
    initialise: Callable[[], None]
    """Loads ``init`` into the method (once); called for a fresh start before anything is written."""

    @property
    def ckpt_dir(self) -> Path:
        """The run's checkpoint folder."""
        return self.folder.path / "checkpoints"


def verify(run: RunToOpen, ckpt: Path) -> ResumePoint:
    """Read ``ckpt`` and check it fits the method and the optimizer, without applying it.

    Raises:
        CheckpointMismatchError: The optimizer state does not fit (another architecture or groups).
        CheckpointError: Unreadable, incomplete or non-finite.

    """
    weights = read_weights(run.method, ckpt)
    state = load_state(ckpt)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt}: training state lacks {', '.join(missing)}")
    try:
        run.new_optimizer().load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(f"{ckpt}: optimizer state does not fit this model ({err})") from None
    return ResumePoint(ckpt, weights, state)


def find_resume_point(run: RunToOpen, resume: str | None) -> ResumePoint | None:
    """The checkpoint to resume from, read and verified but not applied.

    ``auto`` walks back from the newest checkpoint past any that cannot be read, lack part of
    their state or hold NaN/inf, and remembers those to set aside. A checkpoint that is sound
    but does not fit the model means the settings differ from the run's: that is refused, and
    nothing is set aside. A named checkpoint must be usable.

    Raises:
        CheckpointMismatchError: A sound checkpoint of another architecture or optimizer.
        CheckpointError: The named checkpoint is unusable, or every checkpoint in the folder is.

    """
    if resume is None:
        return None
    if resume != "auto":
        return verify(run, resolve_checkpoint(resume))
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run.ckpt_dir)):
        try:
            point = verify(run, ckpt)
        except CheckpointMismatchError as err:
            # Not damage: this config is not the run's. Nothing is set aside.
            raise CheckpointMismatchError(
                f"{err}; resume with the run's own settings ({run.folder.path / CONFIG_FILE}) or choose "
                "another run_dir") from None
        except CheckpointError as err:
            skipped.append((ckpt, str(err)))
            continue
        point.set_aside = skipped
        return point
    if skipped:
        raise CheckpointError(
            f"no usable checkpoint in {run.ckpt_dir}: " + "; ".join(r for _, r in skipped)
            + "; start again with --overwrite")
    return None


def open_run(run: RunToOpen, resume: str | None, overwrite: bool) -> tuple[ResumePoint | None, RunLogger]:
    """Check the run folder and the resume checkpoint, then lock the folder and prepare it for writing.

    Rank 0 alone judges the folder (the other ranks would see it half-prepared); the others then
    read the checkpoint it settled on.

    Returns:
        The verified checkpoint to continue from (None: a fresh start, ``init`` already loaded) and
        the run's logger (disabled on ranks other than 0).

    Raises:
        ConfigError: ``resume`` together with ``overwrite``, or other settings than the run's.
        RunFolderError: The folder holds another run, is in use, or cannot be written.
        CheckpointError: The resume checkpoint cannot be used.

    """
    if resume is not None and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them")
    if not run.info.is_main:
        if not broadcast_from_main([0], run.info)[0]:
            raise RunFolderError(f"rank 0 refused run folder {run.folder.path}")
        point = find_resume_point(run, resume)
        if point is None:
            run.initialise()
        return point, RunLogger(run.folder.path, enabled=False)
    try:
        point, logger = _check_and_prepare(run, resume, overwrite)
    except BaseException:
        run.folder.release()
        broadcast_from_main([0], run.info)
        raise
    broadcast_from_main([1], run.info)
    return point, logger


def _check_and_prepare(run: RunToOpen, resume: str | None, overwrite: bool) -> tuple[ResumePoint | None, RunLogger]:
    folder, run_dir = run.folder, run.folder.path
    folder.check_place()
    folder.check_not_in_use()
    if overwrite:
        folder.check_derived_not_in_use()
    existing = folder.contents()
    # The settings first: a continuation under other settings is refused before any checkpoint is
    # read. A named checkpoint continues the run it belongs to, whichever folder it goes on in.
    changes: dict[str, tuple[Any, Any]] = {}
    source = None
    if resume == "auto" and not overwrite and (run_dir / CONFIG_FILE).is_file():
        changes = check_continuation(run_dir, run.cfg)
    elif resume not in (None, "auto"):
        # A missing or unreadable checkpoint is named as such before its settings are looked for.
        weight_shapes(resolve_checkpoint(resume) / MODEL_FILE)
        source = run_folder_of(resume)
        if source is None and existing:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(existing)}); --resume {resume} is a "
                "checkpoint of another run, --overwrite replaces it, or choose another run_dir")
        if source is None:
            raise ConfigError(f"--resume {resume}: no {CONFIG_FILE} beside it or in its run folder, so its "
                              "settings cannot be compared with these; copy the run's config.yaml beside the "
                              "checkpoint, or start from its weights with init= in a new run_dir")
        changes = check_continuation(source, run.cfg, named=resume)
    other = source if source is not None and source.resolve() != run_dir.resolve() else None
    with reading_run(other):
        point = find_resume_point(run, resume)
        inside = point is not None and run_dir.resolve() in point.ckpt.resolve().parents
        if existing and not overwrite and (resume is None or (point is not None and not inside)):
            how = ("--resume auto continues it" if resume is None
                   else f"--resume {resume} is a checkpoint of another run")
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(existing)}); {how}, "
                "--overwrite replaces it, or choose another run_dir")
        if point is None:
            run.initialise()  # init read and fitted in memory before anything is written
        logger = _prepare_folder(run, point, overwrite, changes, point.ckpt.resolve() if other and point else None)
    return point, logger


def _prepare_folder(run: RunToOpen, point: ResumePoint | None, overwrite: bool,
                    changes: dict[str, tuple[Any, Any]], source: Path | None) -> RunLogger:
    folder, run_dir = run.folder, run.folder.path
    folder.lock()
    folder.check_space(run.checkpoint_bytes)
    if overwrite:
        removed = folder.clear()
        if removed:
            log.warning("replacing the run in %s (removed %s)", run_dir, ", ".join(removed))
    for tmp in remove_temporaries(run.ckpt_dir):
        log.info("removed the half-written %s of an interrupted run", tmp.name)
    step = 0
    if point is not None:
        for ckpt, reason in point.set_aside:
            log.warning("skipping unusable checkpoint: %s; kept as %s", reason, set_aside(ckpt).name)
        step = point.state["step"]
        # Resuming an earlier checkpoint abandons the steps after it: their checkpoints are kept
        # aside, where --resume auto and evaluation never take them for this run's newest.
        for later in list_checkpoints(run.ckpt_dir):
            if checkpoint_step(later) > step:
                log.warning("continuing from step %d: the later %s is kept as %s", step, later.name,
                            set_aside(later, "superseded").name)
    # Rows logged after the checkpoint describe steps that are about to be redone.
    truncate_metrics(run_dir, step)
    if not (run_dir / CONFIG_FILE).is_file():
        # Written once, when the run starts: a continuation records its changes beside it instead.
        write_text(run_dir / CONFIG_FILE, to_yaml(run.cfg))
    for key, (old, new) in changes.items():
        log.warning("continuing with %s = %r (the run had %r); recorded in config-changes.jsonl", key, new, old)
    record_changes(run_dir, step, changes, source)
    return RunLogger(run_dir, purge_step=step + 1, wandb_project=run.cfg.train.wandb,
                     config=json.loads(json.dumps(asdict(run.cfg), default=str)))


__all__ = ["ResumePoint", "RunToOpen", "find_resume_point", "open_run", "verify"]
