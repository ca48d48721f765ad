"""The one training loop, shared by every method, on a CPU, one GPU or under torchrun."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mimkit.config import PretrainConfig, to_yaml
from mimkit.data import Batch, build_dataset, build_loader
from mimkit.engine.checkpoint import (
    MODEL_FILE,
    check_fits,
    checkpoint_bytes,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    nonfinite_tensors,
    read_weights,
    remove_temporaries,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
    weight_shapes,
)
from mimkit.engine.continuation import check_continuation, load_run_config, record_changes
from mimkit.engine.distributed import DistInfo, all_reduce_mean, broadcast_from_main, cleanup, init_distributed
from mimkit.engine.logging import RunLogger, truncate_metrics
from mimkit.engine.optim import build_optimizer, cosine_lr, scaled_lr
from mimkit.engine.precision import resolve_precision
from mimkit.engine.run_folder import CONFIG_FILE, RunFolder, reading_run, run_config_for, run_folder_of, write_text
from mimkit.engine.step import StepResult, train_step
from mimkit.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DataError,
    NonFiniteError,
    RunFolderError,
)
from mimkit.methods import PretrainOutput
from mimkit.models import encoder_from_config, eval_prefix, method_from_config

log = logging.getLogger(__name__)


class NonFiniteLossError(NonFiniteError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


@dataclass
class ResumePoint:
    """A checkpoint read and verified in memory, not yet applied to the model."""

    ckpt: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoints that could not be used, with the reason; renamed once the run is locked."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(cfg: PretrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns the run folder.

    Every check (config, data, model, optimizer, the resume checkpoint, that the folder is free and
    writable) is made before anything is written, so a refused run leaves the folder as it was.

    Args:
        cfg: A validated config (see :func:`mimkit.config.load_config`).
        resume: None for a fresh run, ``auto`` for the newest usable checkpoint in the run folder
            (a fresh start if there is none; corrupt or non-finite newer ones are set aside with a
            warning), or a checkpoint path.
        overwrite: Replace a run already in the folder (its run files are deleted first).

    Returns:
        The run folder, holding ``config.yaml``, ``metrics.jsonl``, ``tb/`` and ``checkpoints/``.

    Raises:
        RunFolderError: The folder holds another run (and neither ``resume`` nor ``overwrite`` was
            given), is in use by another process, or cannot be written.

    """
    info = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, info, resume)
        trainer.open_run(resume, overwrite)
        return trainer.fit()
    finally:
        cleanup(info)


class Trainer:
    """Everything one pre-training run holds; :meth:`fit` is the loop, the other methods its steps."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo, resume: str | None = None) -> None:
        """Build data, method, optimizer and schedule for ``cfg`` on this process's device.

        ``cfg.init`` is loaded here for a fresh run; with ``resume`` given it is loaded only if
        :meth:`open_run` finds nothing to continue, since a continuation's checkpoint holds every weight.
        """
        self.cfg, self.info, tc = cfg, info, cfg.train
        self.device = info.device
        self.precision = resolve_precision(tc.precision, self.device)
        seed_everything(cfg.seed + info.rank)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        # Model, data and optimizer are built in memory only: the run folder is not touched until
        # open_run() has checked everything, so a bad setting leaves nothing behind.
        if cfg.init:
            # Settings read from another run (a fine-tuning's) are checked against its weights before
            # the model they describe takes any memory.
            with reading_run(cfg.init):
                try:
                    init = resolve_checkpoint(cfg.init)
                except CheckpointError:
                    if resume is None:
                        raise
                    init = None  # a continuation takes its weights from its own checkpoint
                if init is not None:
                    init_cfg = run_config_for(init)
                    check_fits(lambda: encoder_from_config(cfg), init / MODEL_FILE,
                               eval_prefix(load_run_config(init_cfg)), init_cfg)
        self.method = method_from_config(cfg).to(self.device)
        multiple = self.method.batch_multiple
        if cfg.optim.batch_size % multiple:
            lower = cfg.optim.batch_size - cfg.optim.batch_size % multiple
            raise ConfigError(
                f"optim.batch_size {cfg.optim.batch_size} is not a multiple of {multiple}: method "
                f"{cfg.method['name']} mixes images in sets of {multiple}; use "
                f"{', '.join(str(v) for v in (lower, lower + multiple) if v > 0)}")
        for view in self.method.views:
            side = view.resolved_size(cfg.data.img_size)
            self.method.check_image_size(side, side)
        self._initialised = False
        if resume is None:
            self._initialise()
        self.data = build_dataset(cfg.data, "train")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.folder = RunFolder(self.run_dir)
        self.logger: RunLogger | None = None

        self.loader = build_loader(self.data, cfg.data, cfg.optim.batch_size, train=True, seed=cfg.seed,
                                   rank=info.rank, world_size=info.world_size, views=self.method.views,
                                   batch_multiple=self.method.batch_multiple)
        self.model = DistributedDataParallel(self.method) if info.distributed else self.method
        self.forward = torch.compile(self.model) if tc.compile else self.model

        self.peak_lr = scaled_lr(cfg.optim, info.world_size)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.peak_lr)
        self.accum = cfg.optim.accum_steps
        steps_per_epoch = len(self.loader) // self.accum
        if steps_per_epoch == 0:
            per_rank = len(self.data) // info.world_size
            raise ConfigError(
                f"an epoch of {per_rank} images{' per rank' if info.distributed else ''} gives "
                f"{len(self.loader)} full batches of optim.batch_size={cfg.optim.batch_size}, fewer than "
                f"optim.accum_steps={self.accum}: no optimizer step could be taken; lower optim.batch_size "
                "or optim.accum_steps")
        self.total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
        self.warmup = self.warmup_cfg = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.max_steps = self.total_steps
        self.step, self.epoch, self.start_batch, self.bad_steps = 0, 0, 0, 0
        self.grad_norm: torch.Tensor | None = None
        self.t_start, self.step_at_start, self.minutes_before = time.perf_counter(), 0, 0.0
        self._reset_window()

    def _initialise(self) -> None:
        """Load ``cfg.init``, once, into the trained encoder (nothing without an ``init``)."""
        if self.cfg.init and not self._initialised:
            self._initialise_from(self.cfg.init)
        self._initialised = True

    def _initialise_from(self, path: str) -> None:
        """Load another run's evaluated module (its encoder, or teacher) into this method's trained encoder."""
        with reading_run(path):
            ckpt = resolve_checkpoint(path)
            source = load_run_config(run_config_for(ckpt))
            load_weights(self.method.encoder, ckpt, prefix=eval_prefix(source))
        self.method.encoder_loaded()  # a teacher starts from the loaded student
        log.info("initialised the encoder from %s (%s's %s)", ckpt, source.method["name"],
                 eval_prefix(source).rstrip("."))

    def _reset_window(self) -> None:
        """Start a new logging window (images seen and losses since the last log line)."""
        self.t_log, self.seen, self.loss_n = time.perf_counter(), 0, 0
        self.loss_sum = torch.zeros((), device=self.device)

    def find_resume_point(self, resume: str | None) -> ResumePoint | None:
        """Read and verify the checkpoint to resume from, without applying it.

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
            ckpt = resolve_checkpoint(resume)
            return ResumePoint(ckpt, *self._verify(ckpt))
        skipped: list[tuple[Path, str]] = []
        for ckpt in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                return ResumePoint(ckpt, *self._verify(ckpt), set_aside=skipped)
            except CheckpointMismatchError as err:
                # Not damage: this config is not the run's. Nothing is set aside.
                raise CheckpointMismatchError(
                    f"{err}; resume with the run's own settings ({self.run_dir / CONFIG_FILE}) or choose "
                    "another run_dir") from None
            except CheckpointError as err:
                skipped.append((ckpt, str(err)))
        if skipped:
            raise CheckpointError(
                f"no usable checkpoint in {self.ckpt_dir}: " + "; ".join(r for _, r in skipped)
                + "; start again with --overwrite")
        return None

    def _verify(self, ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        weights = read_weights(self.method, ckpt)
        state = load_state(ckpt)
        missing = [k for k in ("optimizer", "step", "epoch", "batch_in_epoch", "rng") if k not in state]
        if missing:
            raise CheckpointError(f"{ckpt}: training state lacks {', '.join(missing)}")
        # Loading into a scratch copy finds a parameter-group mismatch before anything changes.
        scratch = build_optimizer(self.method, self.cfg.optim, self.peak_lr)
        try:
            scratch.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointMismatchError(f"{ckpt}: optimizer state does not fit this model ({err})") from None
        return weights, state

    def open_run(self, resume: str | None = None, overwrite: bool = False) -> None:
        """Check the run folder and the resume checkpoint, then lock the folder and start writing.

        Raises:
            ConfigError: ``resume`` together with ``overwrite``.
            RunFolderError: See :func:`pretrain`.
            CheckpointError: The resume checkpoint cannot be used.

        """
        if resume is not None and overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them")
        if not self.info.is_main:
            # Rank 0 alone judges the folder (the other ranks would see it half-prepared), and only
            # then do they read the checkpoint it settled on.
            if not broadcast_from_main([0], self.info)[0]:
                raise RunFolderError(f"rank 0 refused run folder {self.run_dir}")
            self.logger = RunLogger(self.run_dir, enabled=False)
            point = self.find_resume_point(resume)
        else:
            try:
                point = self._check_and_prepare(resume, overwrite)
            except BaseException:
                self.folder.release()
                broadcast_from_main([0], self.info)
                raise
            broadcast_from_main([1], self.info)
        if point is not None:
            self._apply(point)
        else:
            self._initialise()  # a fresh start; a continuation takes every weight from its checkpoint

    def _check_and_prepare(self, resume: str | None, overwrite: bool) -> ResumePoint | None:
        self.folder.check_place()
        self.folder.check_not_in_use()
        if overwrite:
            self.folder.check_derived_not_in_use()
        existing = self.folder.contents()
        # The settings first: a continuation under other settings is refused before any checkpoint is
        # read. A named checkpoint continues the run it belongs to, whichever folder it goes on in.
        changes: dict[str, tuple[Any, Any]] = {}
        source = None
        if resume == "auto" and not overwrite and (self.run_dir / CONFIG_FILE).is_file():
            changes = check_continuation(self.run_dir, self.cfg)
        elif resume not in (None, "auto"):
            # A missing or unreadable checkpoint is named as such before its settings are looked for.
            weight_shapes(resolve_checkpoint(resume) / MODEL_FILE)
            source = run_folder_of(resume)
            if source is None and existing:
                raise RunFolderError(
                    f"run folder {self.run_dir} already holds a run ({', '.join(existing)}); --resume {resume} is a "
                    "checkpoint of another run, --overwrite replaces it, or choose another run_dir")
            if source is None:
                raise ConfigError(f"--resume {resume}: no {CONFIG_FILE} beside it or in its run folder, so its "
                                  "settings cannot be compared with these; copy the run's config.yaml beside the "
                                  "checkpoint, or start from its weights with init= in a new run_dir")
            changes = check_continuation(source, self.cfg, named=resume)
        other = source if source is not None and source.resolve() != self.run_dir.resolve() else None
        with reading_run(other):
            point = self.find_resume_point(resume)
            inside = point is not None and self.run_dir.resolve() in point.ckpt.resolve().parents
            if existing and not overwrite and (resume is None or (point is not None and not inside)):
                how = ("--resume auto continues it" if resume is None
                       else f"--resume {resume} is a checkpoint of another run")
                raise RunFolderError(
                    f"run folder {self.run_dir} already holds a run ({', '.join(existing)}); {how}, "
                    "--overwrite replaces it, or choose another run_dir")
            if point is None:
                self._initialise()  # init read and fitted in memory before anything is written
            self._prepare_folder(point, overwrite, changes, point.ckpt.resolve() if other and point else None)
        return point

    def _prepare_folder(self, point: ResumePoint | None, overwrite: bool, changes: dict[str, tuple[Any, Any]],
                        source: Path | None) -> None:
        self.folder.lock()
        self.folder.check_space(checkpoint_bytes(self.method))
        if overwrite:
            removed = self.folder.clear()
            if removed:
                log.warning("replacing the run in %s (removed %s)", self.run_dir, ", ".join(removed))
        for tmp in remove_temporaries(self.ckpt_dir):
            log.info("removed the half-written %s of an interrupted run", tmp.name)
        step = 0
        if point is not None:
            for ckpt, reason in point.set_aside:
                log.warning("skipping unusable checkpoint: %s; kept as %s", reason, set_aside(ckpt).name)
            step = point.state["step"]
            # Resuming an earlier checkpoint abandons the steps after it: their checkpoints are kept
            # aside, where --resume auto and evaluation never take them for this run's newest.
            for later in list_checkpoints(self.ckpt_dir):
                if checkpoint_step(later) > step:
                    log.warning("continuing from step %d: the later %s is kept as %s", step, later.name,
                                set_aside(later, "superseded").name)
        # Rows logged after the checkpoint describe steps that are about to be redone.
        truncate_metrics(self.run_dir, step)
        if not (self.run_dir / CONFIG_FILE).is_file():
            # Written once, when the run starts: a continuation records its changes beside it instead.
            write_text(self.run_dir / CONFIG_FILE, to_yaml(self.cfg))
        for key, (old, new) in changes.items():
            log.warning("continuing with %s = %r (the run had %r); recorded in config-changes.jsonl", key, new, old)
        record_changes(self.run_dir, step, changes, source)
        self.logger = RunLogger(self.run_dir, purge_step=step + 1)

    def _apply(self, point: ResumePoint) -> None:
        state = point.state
        self.method.load_state_dict(point.weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.minutes_before = state.get("train_minutes", 0.0)
        set_rng_state(state["rng"][min(self.info.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", point.ckpt, self.step, self.epoch,
                 self.start_batch)

    def checkpoint(self, batch_in_epoch: int) -> None:
        """Save the complete training state; ``batch_in_epoch`` is where a resumed run restarts."""
        # Every rank's RNG state is gathered so that a resumed DDP run replays each shard exactly.
        states = [rng_state()]
        if self.info.distributed:
            states = [None] * self.info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if self.info.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                     "batch_in_epoch": batch_in_epoch, "rng": states, "total_steps": self.total_steps,
                     "train_minutes": self.minutes()}
            save_checkpoint(self.ckpt_dir, self.step, self.method, state, self.cfg.train.keep_last)

    def minutes(self) -> float:
        """Training minutes so far, including those before a resume."""
        return self.minutes_before + (time.perf_counter() - self.t_start) / 60

    def fit_schedule_to_budget(self) -> None:
        """Re-estimate ``total_steps`` so that the cosine ends when ``train.budget_minutes`` runs out."""
        budget, done = self.cfg.train.budget_minutes, self.step - self.step_at_start
        if budget <= 0 or done < 5:  # a few steps first: the first ones include warm-up costs
            return
        rate = done / max(time.perf_counter() - self.t_start, 1e-9) * 60  # steps per minute
        remaining = max(0.0, budget - self.minutes())
        estimate = min(self.max_steps, max(self.step + 1, round(self.step + rate * remaining)))
        self.total_steps = broadcast_from_main([estimate], self.info)[0]
        # A short budget may not even cover optim.warmup_epochs: warmup is then cut to a quarter of
        # the schedule, so that the run still reaches its peak lr and anneals.
        warmup = min(self.warmup, self.total_steps // 4)  # never lengthened: lr would dip back
        if warmup < self.warmup == self.warmup_cfg:  # the first cut
            log.warning("budget of %g min is about %d steps: warmup cut from %d to %d steps",
                        budget, self.total_steps, self.warmup_cfg, warmup)
        self.warmup = warmup

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` or ``train.budget_minutes`` is spent (rank 0's clock decides)."""
        limits = [m for m in (self.cfg.train.max_minutes, self.cfg.train.budget_minutes) if m > 0]
        if not limits:
            return False
        return bool(broadcast_from_main([int(self.minutes() >= min(limits))], self.info)[0])

    def optimizer_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        """One step of the engine's :func:`~mimkit.engine.step.train_step` over ``micro_batches`` at ``lr``.

        Returns:
            The step's result (``taken`` False: skipped as non-finite).

        Raises:
            NonFiniteLossError: After ``train.max_bad_steps`` skipped steps in a row.
            NonFiniteError: The weights became NaN/inf although the loss and gradient were finite.

        """
        result = train_step(self.forward, self.method, micro_batches, self.optimizer, device=self.device,
                            precision=self.precision, lr=lr, step=self.step, total_steps=self.total_steps,
                            clip_grad=self.cfg.optim.clip_grad, info=self.info)
        self.grad_norm = result.grad_norm
        self.seen += result.images
        if not result.taken:
            self._skip_nonfinite()
            return result
        self.bad_steps = 0
        self.loss_sum += result.loss
        self.loss_n += 1
        self.step += 1
        if self.step % self.cfg.train.log_every == 0:
            bad = nonfinite_tensors(dict(self.method.named_parameters()))
            if bad:
                raise NonFiniteError(
                    f"the weights {', '.join(bad)} became NaN or inf by step {self.step} although the loss "
                    f"and gradient were finite. {self._last_good()}; lower optim.base_lr or set "
                    "optim.clip_grad, then resume with --resume auto")
        return result

    def _last_good(self) -> str:
        last = latest_checkpoint(self.ckpt_dir)
        if last is None:
            return "No checkpoint was written yet"
        return f"The last checkpoint, {last}, was checked finite when written"

    def _skip_nonfinite(self) -> None:
        self.bad_steps += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", self.step, self.bad_steps)
        if self.info.is_main:
            self.logger.log(self.step, {"skipped_nonfinite": self.bad_steps})
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive non-finite steps at step {self.step}; stopping. {self._last_good()}; "
                "lower optim.base_lr, set optim.clip_grad or use train.precision=fp32, then resume with "
                "--resume auto"
            )

    def log_step(self, out: PretrainOutput, lr: float, epoch_pos: float) -> str:
        """Write the window's mean loss, lr and throughput to the run log; returns the bar's summary."""
        now = time.perf_counter()
        loss = all_reduce_mean(self.loss_sum / max(1, self.loss_n), self.info).item()
        ips = self.seen * self.info.world_size / max(now - self.t_log, 1e-9)
        row = {"loss": loss, "lr": lr, "img_per_s": ips, "epoch": epoch_pos, "elapsed_min": self.minutes(),
               "planned_steps": self.total_steps, "skipped_images": self.loader.skipped}
        row.update({k: float(v) for k, v in out.logs.items()})
        if self.grad_norm is not None:
            row["grad_norm"] = float(self.grad_norm)
        if self.device.type == "cuda":  # what the source documents report as a method's memory cost
            row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.logger.log(self.step, row)
        self._reset_window()
        return f"loss={loss:.4f} img/s={ips:.0f} lr={lr:.2e}"

    def _run_epoch(self, bar: tqdm) -> bool:
        """Train from ``self.start_batch`` to the end of the epoch; returns whether the run is over."""
        tc, steps_before = self.cfg.train, self.step
        self.loader.set_epoch(self.epoch, self.start_batch)
        pending: list[Batch] = []
        for batch_idx, batch in enumerate(self.loader, start=self.start_batch):
            pending.append(batch)
            if len(pending) < self.accum:
                continue
            self.fit_schedule_to_budget()
            bar.total = self.total_steps
            lr = cosine_lr(self.step, self.total_steps, self.warmup, self.peak_lr, self.cfg.optim.min_lr)
            result, pending = self.optimizer_step(pending, lr), []
            if not result.taken:
                continue
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                bar.set_postfix_str(self.log_step(result.out, lr, self.epoch + (batch_idx + 1) / len(self.loader)))
            out_of_time = self.out_of_time()
            if self.step >= self.total_steps or out_of_time:
                self.checkpoint(batch_idx + 1)
                if out_of_time and self.info.is_main:
                    log.info("time limit reached after %.1f min at step %d; checkpoint saved", self.minutes(),
                             self.step)
                return True
            if tc.ckpt_every_steps and self.step % tc.ckpt_every_steps == 0:
                self.checkpoint(batch_idx + 1)
        if self.step == steps_before and self.start_batch == 0:
            # e.g. a streamed folder whose images all fail to decode: never loop forever.
            raise DataError(f"epoch {self.epoch} took no optimizer step ({self.loader.skipped} unreadable images "
                            f"skipped of {len(self.data)}); check the images under data.root")
        # Micro-batches left over when an epoch is not a multiple of accum_steps are dropped.
        self.epoch, self.start_batch = self.epoch + 1, 0
        self.checkpoint(0)
        if self.loader.skipped and self.info.is_main:
            log.warning("%d unreadable images skipped so far", self.loader.skipped)
        return False

    def fit(self, resume: str | None = None, overwrite: bool = False) -> Path:
        """Run (or resume) the schedule to its end or to ``train.max_minutes``; returns the run folder.

        ``resume`` and ``overwrite`` are those of :meth:`open_run`, which runs first unless it already has.
        """
        if self.logger is None:
            self.open_run(resume, overwrite)
        try:
            return self._fit()
        finally:
            self.logger.close()
            self.folder.release()

    def _fit(self) -> Path:
        cfg, tc, info = self.cfg, self.cfg.train, self.info
        if info.is_main:
            plan = (f"schedule fitted to {tc.budget_minutes:g} min (at most {self.total_steps} steps)"
                    if tc.budget_minutes > 0 else f"{self.total_steps} steps")
            log.info("%s: %d images, %s of %d images, peak lr %.3g, %s on %s", cfg.method["name"],
                     len(self.data), plan, cfg.optim.batch_size * self.accum * info.world_size,
                     self.peak_lr, self.precision, self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (tc.progress and info.is_main),
                   dynamic_ncols=True, desc=cfg.method["name"])
        self.method.train()
        self.t_start, self.step_at_start = time.perf_counter(), self.step
        self._reset_window()
        try:
            while self.step < self.total_steps and not self._run_epoch(bar):
                pass
        finally:
            bar.close()
        if info.is_main:
            log.info("done: %d steps in %.1f min; run folder %s", self.step, self.minutes(), self.run_dir)
        return self.run_dir
