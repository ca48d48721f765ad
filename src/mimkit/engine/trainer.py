"""The one training loop, shared by every method, on a CPU, one GPU or under torchrun."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from mimkit.backbones.from_timm import is_timm_source, load_timm_weights
from mimkit.config import DataConfig, PretrainConfig
from mimkit.data import TORCH_DATASET, Batch, BatchLoader, build_dataset, build_loader, from_torch_dataset
from mimkit.data.datasets import dataset_stats
from mimkit.engine.checkpoint import (
    MODEL_FILE,
    check_fits,
    checkpoint_bytes,
    latest_checkpoint,
    load_weights,
    nonfinite_tensors,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.engine.continuation import load_run_config
from mimkit.engine.distributed import DistInfo, all_reduce_mean, broadcast_from_main, cleanup, init_distributed
from mimkit.engine.logging import RunLogger
from mimkit.engine.optim import Schedule, build_optimizer, scaled_lr
from mimkit.engine.precision import grad_scaler, resolve_precision
from mimkit.engine.resume import ResumePoint, RunToOpen, open_run
from mimkit.engine.run_folder import CONFIG_FILE, RunFolder, reading_run, run_config_for
from mimkit.engine.step import StepResult, train_step
from mimkit.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from mimkit.methods import PretrainOutput
from mimkit.methods.helpers import check_helper_data
from mimkit.models import check_method_input, encoder_from_config, eval_prefix, method_from_config
from mimkit.schema import require

log = logging.getLogger(__name__)


class NonFiniteLossError(NonFiniteError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(cfg: PretrainConfig, resume: str | None = None, overwrite: bool = False,
             dataset: Dataset | None = None) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data`` (or on ``dataset``); returns the run folder.

    Example:
        >>> import mimkit
        >>> cfg = mimkit.load_config("mae_vits_rgb64", ["run_dir=runs/mine"])
        >>> mimkit.pretrain(cfg, dataset=my_images)  # doctest: +SKIP

    Every check (config, data, model, optimizer, the resume checkpoint, that the folder is free and
    writable) is made before anything is written, so a refused run leaves the folder as it was.

    Args:
        cfg: A validated config (see :func:`mimkit.models.load_config`).
        resume: None for a fresh run, ``auto`` for the newest usable checkpoint in the run folder
            (a fresh start if there is none; corrupt or non-finite newer ones are set aside with a
            warning), or a checkpoint path.
        overwrite: Replace a run already in the folder (its run files are deleted first).
        dataset: A map-style torch ``Dataset`` of images to train on instead of the one ``cfg.data``
            names (:func:`~mimkit.data.from_torch_dataset`: PIL images, ``[C, H, W]`` tensors or
            ``(image, label)`` pairs, without random transforms); ``cfg.data`` still gives the
            size, channels and augmentation. The run records ``data.name=torch_dataset``.

    Returns:
        The run folder, holding ``config.yaml``, ``metrics.jsonl``, ``tb/`` and ``checkpoints/``.

    Raises:
        RunFolderError: The folder holds another run (and neither ``resume`` nor ``overwrite`` was
            given), is in use by another process, or cannot be written.

    """
    info = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, info, resume, dataset)
        trainer.open(resume, overwrite)
        return trainer.fit()
    finally:
        cleanup(info)


def _stored_stats(run_dir: str) -> tuple[list[float], list[float]] | None:
    """The normalisation the run in ``run_dir`` stored, ``([], [])`` for a run from before runs stored
    one (it goes on without, as it trained), or None where there is no readable run.
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text()).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # no run, or one the resume checks will refuse with their own message
    if not isinstance(data, dict):
        return None
    return list(data.get("mean") or []), list(data.get("std") or [])


class Trainer:
    """Everything one pre-training run holds; :meth:`fit` is the loop, the other methods its steps."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo, resume: str | None = None,
                 dataset: Dataset | None = None) -> None:
        """Build data, method, optimizer and schedule for ``cfg`` (on ``dataset`` if given) on this process's device.

        ``cfg.init`` is loaded here for a fresh run; with ``resume`` given it is loaded only if
        :meth:`open` finds nothing to continue, since a continuation's checkpoint holds every weight.
        Model, data and optimizer are built in memory only: the run folder is not touched until
        :meth:`open` has checked everything, so a bad setting leaves nothing behind.
        """
        self.cfg, self.info, tc = cfg, info, cfg.train
        if tc.wandb and info.is_main and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"train.wandb={tc.wandb} mirrors the run to Weights & Biases, which is not installed: "
                              "pip install 'mimkit[wandb]' (or wandb), or leave train.wandb empty")
        self.device = info.device
        self.precision = resolve_precision(tc.precision, self.device)
        seed_everything(cfg.seed + info.rank)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.init:
            self._check_init_fits(resume)
        self.method = method_from_config(cfg).to(self.device)
        check_method_input(cfg, self.method)
        self._initialised = False
        if resume is None:
            self._initialise()
        if dataset is not None:  # recorded as such: no setting can rebuild it
            if tc.eval_every:
                raise ConfigError("train.eval_every scores kNN on a labelled dataset named by the settings, which a "
                                  "run on a torch Dataset from Python has not; set train.eval_every=0")
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=TORCH_DATASET, root=""))
        self.data = build_dataset(cfg.data, "train") if dataset is None else from_torch_dataset(dataset, cfg.data)
        if not cfg.data.mean:
            # Written to config.yaml when the run opens: every later command normalises as training did.
            # A continuation takes the run's own, not a recomputation that another machine may round
            # otherwise (the continuation's check compares every setting exactly).
            stored = _stored_stats(cfg.run_dir) if resume else None
            mean, std = stored if stored is not None else self._dataset_stats(cfg.data)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=mean, std=std))
        for warning in check_helper_data(cfg.method, cfg.data.channels, cfg.data.mean, cfg.data.std):
            if info.is_main:
                log.warning(warning)
        self.cfg = cfg
        self.folder = RunFolder(cfg.run_dir)
        self.ckpt_dir = self.folder.path / "checkpoints"
        self.logger: RunLogger | None = None
        self.loader: BatchLoader = build_loader(
            self.data, cfg.data, cfg.optim.batch_size, train=True, seed=cfg.seed, rank=info.rank,
            world_size=info.world_size, views=self.method.views, batch_multiple=self.method.batch_multiple)
        self.model = DistributedDataParallel(self.method) if info.distributed else self.method
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.schedule = self._plan()
        self.optimizer = build_optimizer(self.method, cfg.optim, self.schedule.peak_lr)
        self.scaler = grad_scaler(self.device, self.precision)
        self.step, self.epoch, self.start_batch, self.bad_steps = 0, 0, 0, 0
        self.clock = Clock()
        self.window = LogWindow(self.device)
        self.monitor = None
        if tc.eval_every and info.is_main:
            from mimkit.evaluation.monitor import KnnMonitor  # evaluation imports the engine: here, not above

            self.monitor = KnnMonitor(cfg.data, tc.eval_fraction, self.device, self.precision)

    def _dataset_stats(self, cfg: DataConfig) -> tuple[list[float], list[float]]:
        """The training set's normalisation, computed by rank 0 alone and shared (every rank would get the
        same numbers, at the cost of decoding up to ten thousand images each when streamed).
        """
        channels = cfg.channels
        mean, std = dataset_stats(self.data, cfg) if self.info.is_main else ([0.0] * channels, [0.0] * channels)
        shared = broadcast_from_main([float(v) for v in (*mean, *std)], self.info)
        return shared[:channels], shared[channels:]

    def _check_init_fits(self, resume: str | None) -> None:
        """Check ``init``'s weights against the encoder on the meta device, before any memory is taken.

        Settings read from another run (a fine-tuning's) are checked against its weights before the
        model they describe is built. Released weights (``timm:``, ``local-dir:``, ``hf-hub:``) are
        checked when they are loaded, still before anything is written.
        """
        if is_timm_source(self.cfg.init):
            return
        with reading_run(self.cfg.init):
            try:
                init = resolve_checkpoint(self.cfg.init)
            except CheckpointError:
                if resume is None:
                    raise
                return  # a continuation takes its weights from its own checkpoint
            init_cfg = run_config_for(init)
            check_fits(lambda: encoder_from_config(self.cfg), init / MODEL_FILE,
                       eval_prefix(load_run_config(init_cfg)), init_cfg)

    def _plan(self) -> Schedule:
        """The schedule ``train.epochs`` and ``optim.warmup_epochs`` give, with the peak lr for this job.

        Raises:
            ConfigError: An epoch too short for one optimizer step, or ``optim.min_lr`` above the peak.

        """
        cfg, info = self.cfg, self.info
        accum = cfg.optim.accum_steps
        steps_per_epoch = len(self.loader) // accum
        if steps_per_epoch == 0:
            per_rank = len(self.data) // info.world_size
            raise ConfigError(
                f"an epoch of {per_rank} images{' per rank' if info.distributed else ''} gives "
                f"{len(self.loader)} full batches of optim.batch_size={cfg.optim.batch_size}, fewer than "
                f"optim.accum_steps={accum}: no optimizer step could be taken; lower optim.batch_size "
                "or optim.accum_steps")
        peak = scaled_lr(cfg.optim, info.world_size)
        require(cfg.optim.min_lr <= peak, "optim.min_lr", f"at most the peak lr {peak:.3g} (optim.base_lr x "
                f"effective batch / 256, {info.world_size} process(es))", cfg.optim.min_lr)
        total = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        return Schedule(total, round(cfg.optim.warmup_epochs * steps_per_epoch), peak, cfg.optim.min_lr, total)

    def _initialise(self) -> None:
        """A fresh run's start, once: ``cfg.init`` into the trained encoder, the method's frozen helpers
        from their runs (a continuation's checkpoint holds both).
        """
        if not self._initialised:
            if self.cfg.init:
                self._initialise_from(self.cfg.init)
            self.method.load_helpers()
        self._initialised = True

    def _initialise_from(self, path: str) -> None:
        """Load another run's evaluated module (its encoder, or teacher), or released ViT weights
        (:mod:`~mimkit.backbones.from_timm`), into this method's trained encoder.
        """
        if is_timm_source(path):
            load_timm_weights(self.method.encoder, path)
            self.method.encoder_loaded()
            return
        with reading_run(path):
            ckpt = resolve_checkpoint(path)
            source = load_run_config(run_config_for(ckpt))
            load_weights(self.method.encoder, ckpt, prefix=eval_prefix(source))
        self.method.encoder_loaded()  # a teacher starts from the loaded student
        log.info("initialised the encoder from %s (%s's %s)", ckpt, source.method.name,
                 eval_prefix(source).rstrip("."))

    def open(self, resume: str | None = None, overwrite: bool = False) -> None:
        """Check the folder and the resume checkpoint (:func:`~mimkit.engine.resume.open_run`), then apply it."""
        run = RunToOpen(self.cfg, self.info, self.folder, self.method,
                        lambda: build_optimizer(self.method, self.cfg.optim, self.schedule.peak_lr),
                        checkpoint_bytes(self.method), self._initialise)
        point, self.logger = open_run(run, resume, overwrite)
        if point is not None:
            self._apply(point)

    def _apply(self, point: ResumePoint) -> None:
        state = point.state
        self.method.load_state_dict(point.weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.clock.minutes_before = state.get("train_minutes", 0.0)
        set_rng_state(state["rng"][min(self.info.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", point.ckpt, self.step, self.epoch,
                 self.start_batch)

    # ---- the loop ----

    def fit(self, resume: str | None = None, overwrite: bool = False) -> Path:
        """Run (or resume) the schedule to its end or to ``train.max_minutes``; returns the run folder.

        ``resume`` and ``overwrite`` are those of :meth:`open`, which runs first unless it already has.
        """
        if self.logger is None:
            self.open(resume, overwrite)
        bar = tqdm(total=self.schedule.total_steps, initial=self.step, dynamic_ncols=True, desc=self.cfg.method.name,
                   disable=not (self.cfg.train.progress and self.info.is_main))
        try:
            self._announce()
            self.method.train()
            self.clock.start(self.step)
            self.window.reset()
            self._train(bar)
        finally:
            bar.close()
            self.logger.close()
            self.folder.release()
        if self.info.is_main:
            log.info("done: %d steps in %.1f min; run folder %s", self.step, self.clock.minutes(), self.folder.path)
        return self.folder.path

    def _train(self, bar: tqdm) -> None:
        """Epochs of optimizer steps until the schedule ends or the time is up, checkpointing on the way."""
        ckpt_every = self.cfg.train.ckpt_every_steps
        while self.step < self.schedule.total_steps:
            self.loader.set_epoch(self.epoch, self.start_batch)
            steps_before = self.step
            for next_batch, micro_batches in accumulate(self.loader, self.cfg.optim.accum_steps, self.start_batch):
                result = self.optimizer_step(micro_batches)
                if not result.taken:
                    continue
                bar.total = self.schedule.total_steps
                bar.update(1)
                if self.step % self.cfg.train.log_every == 0 or self.step == self.schedule.total_steps:
                    bar.set_postfix_str(self.log_step(result.out, next_batch))
                if self.cfg.train.eval_every and (self.step % self.cfg.train.eval_every == 0
                                                  or self.step == self.schedule.total_steps):
                    self.watch()
                out_of_time = self.out_of_time()
                if self.step >= self.schedule.total_steps or out_of_time:
                    self.checkpoint(next_batch)
                    if out_of_time and self.info.is_main:
                        log.info("time limit reached after %.1f min at step %d; checkpoint saved",
                                 self.clock.minutes(), self.step)
                    return
                if ckpt_every and self.step % ckpt_every == 0:
                    self.checkpoint(next_batch)
            self._end_epoch(took_steps=self.step > steps_before)

    def _end_epoch(self, took_steps: bool) -> None:
        """Move to the next epoch and checkpoint; an epoch from its start that took no step is an error."""
        if not took_steps and self.start_batch == 0:
            # e.g. a streamed folder whose images all fail to decode: never loop forever.
            raise DataError(f"epoch {self.epoch} took no optimizer step ({self.loader.skipped} unreadable images "
                            f"skipped of {len(self.data)}); check the images under data.root")
        # Micro-batches left over when an epoch is not a multiple of accum_steps are dropped.
        self.epoch, self.start_batch = self.epoch + 1, 0
        self.checkpoint(0)
        if self.loader.skipped and self.info.is_main:
            log.warning("%d unreadable images skipped so far", self.loader.skipped)

    def _announce(self) -> None:
        cfg, tc, info = self.cfg, self.cfg.train, self.info
        if info.is_main:
            plan = (f"schedule fitted to {tc.budget_minutes:g} min (at most {self.schedule.total_steps} steps)"
                    if tc.budget_minutes > 0 else f"{self.schedule.total_steps} steps")
            log.info("%s: %d images, %s of %d images, peak lr %.3g, %s on %s", cfg.method.name, len(self.data),
                     plan, cfg.optim.batch_size * cfg.optim.accum_steps * info.world_size, self.schedule.peak_lr,
                     self.precision, self.device)

    # ---- one step and what follows it ----

    def optimizer_step(self, micro_batches: list[Batch]) -> StepResult:
        """One step of the engine's :func:`~mimkit.engine.step.train_step` over ``micro_batches``.

        Returns:
            The step's result (``taken`` False: skipped as non-finite).

        Raises:
            NonFiniteLossError: After ``train.max_bad_steps`` skipped steps in a row.
            NonFiniteError: The weights became NaN/inf although the loss and gradient were finite.

        """
        self.fit_schedule_to_budget()
        result = train_step(self.forward, self.method, micro_batches, self.optimizer, device=self.device,
                            precision=self.precision, lr=self.schedule.lr(self.step), step=self.step,
                            total_steps=self.schedule.total_steps, clip_grad=self.cfg.optim.clip_grad,
                            clip_mode=self.cfg.optim.clip_mode, info=self.info, scaler=self.scaler)
        self.window.add(result)
        if not result.taken:
            if not self._fp16_overflow(result):
                self._skip_nonfinite()
            return result
        self.bad_steps = 0
        self.step += 1
        if self.step % self.cfg.train.log_every == 0:
            bad = nonfinite_tensors(dict(self.method.named_parameters()))
            if bad:
                raise NonFiniteError(
                    f"the weights {', '.join(bad)} became NaN or inf by step {self.step} although the loss "
                    f"and gradient were finite. {self._last_good()}; lower optim.base_lr or set "
                    "optim.clip_grad, then resume with --resume auto")
        return result

    def watch(self) -> None:
        """Score the evaluated module with kNN on a small bank (``train.eval_every``), logged as ``eval/knn20``.

        The main process evaluates while the others wait at the next collective; the time it takes
        is taken off the training clock and the throughput window, so a budgeted run trains as long
        as without it.
        """
        t0 = time.perf_counter()
        if self.monitor is not None:
            row = self.monitor(self.method.eval_module)
            self.method.train()
            self.logger.log(self.step, row, prefix="eval")
            log.info("step %d: kNN k=20 %.2f %% (%d bank, %d query images)", self.step, row["knn20"],
                     row["knn_bank"], row["knn_queries"])
        spent = time.perf_counter() - t0
        self.clock.t_start += spent
        self.window.t_start += spent  # nor in the logged images per second

    def fit_schedule_to_budget(self) -> None:
        """Re-estimate the schedule's length so that the cosine ends when ``train.budget_minutes`` runs out."""
        budget, done = self.cfg.train.budget_minutes, self.step - self.clock.step_at_start
        if budget <= 0 or done < 5:  # a few steps first: the first ones include warm-up costs
            return
        remaining = max(0.0, budget - self.clock.minutes())
        estimate = min(self.schedule.max_steps,
                       max(self.step + 1, round(self.step + self.clock.steps_per_minute(self.step) * remaining)))
        fitted = self.schedule.fitted(broadcast_from_main([estimate], self.info)[0])
        planned = round(self.cfg.optim.warmup_epochs * (len(self.loader) // self.cfg.optim.accum_steps))
        if fitted.warmup < self.schedule.warmup == planned:  # the first cut
            log.warning("budget of %g min is about %d steps: warmup cut from %d to %d steps",
                        budget, fitted.total_steps, self.schedule.warmup, fitted.warmup)
        self.schedule = fitted

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` or ``train.budget_minutes`` is spent (rank 0's clock decides)."""
        limits = [m for m in (self.cfg.train.max_minutes, self.cfg.train.budget_minutes) if m > 0]
        if not limits:
            return False
        return bool(broadcast_from_main([int(self.clock.minutes() >= min(limits))], self.info)[0])

    def checkpoint(self, batch_in_epoch: int) -> None:
        """Save the complete training state; ``batch_in_epoch`` is where a resumed run restarts."""
        # Every rank's RNG state is gathered so that a resumed DDP run replays each shard exactly.
        states = [rng_state()]
        if self.info.distributed:
            states = [None] * self.info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if self.info.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                     "batch_in_epoch": batch_in_epoch, "rng": states, "total_steps": self.schedule.total_steps,
                     "train_minutes": self.clock.minutes()}
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
            save_checkpoint(self.ckpt_dir, self.step, self.method, state, self.cfg.train.keep_last)

    def _last_good(self) -> str:
        last = latest_checkpoint(self.ckpt_dir)
        if last is None:
            return "No checkpoint was written yet"
        return f"The last checkpoint, {last}, was checked finite when written"

    def _fp16_overflow(self, result: StepResult) -> bool:
        """Whether a skipped step was fp16's loss scale overflowing a finite loss's gradient.

        The scaler has already halved its scale: the next step retries with it, and the skip is no
        sign of a diverging run. Once the scale is below 1 an overflow is an inf gradient whatever
        the scale, and counts as a non-finite step.
        """
        if self.scaler is None or not bool(torch.isfinite(result.loss)) or self.scaler.get_scale() < 1.0:
            return False
        log.info("fp16 gradient overflow at step %d: step skipped, loss scale lowered to %g", self.step,
                 self.scaler.get_scale())
        return True

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

    def log_step(self, out: PretrainOutput, next_batch: int) -> str:
        """Write the window's mean loss, lr and throughput to the run log; returns the bar's summary."""
        loss, ips = self.window.means(self.info)
        lr = self.schedule.lr(self.step - 1)  # the lr the step just taken used
        row = {"loss": loss, "lr": lr, "img_per_s": ips, "epoch": self.epoch + next_batch / len(self.loader),
               "elapsed_min": self.clock.minutes(), "planned_steps": self.schedule.total_steps,
               "skipped_images": self.loader.skipped}
        row.update({k: float(v) for k, v in out.logs.items()})
        if self.window.grad_norm is not None:
            row["grad_norm"] = float(self.window.grad_norm)
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":  # what method comparisons report as a method's memory cost
            row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.logger.log(self.step, row)
        self.window.reset()
        return f"loss={loss:.4f} img/s={ips:.0f} lr={lr:.2e}"


def accumulate(loader: Iterable[Batch], accum: int, start: int) -> Iterator[tuple[int, list[Batch]]]:
    """The loader's batches in groups of ``accum`` (one optimizer step each), with the index of the
    batch after each group (where a run resumed after that step starts); a last short group is dropped.
    """
    group: list[Batch] = []
    for index, batch in enumerate(loader, start=start):
        group.append(batch)
        if len(group) == accum:
            yield index + 1, group
            group = []


class Clock:
    """Training minutes, counting those before a resume, and the step rate since this process started."""

    def __init__(self) -> None:
        """A clock started now, with no minutes before."""
        self.minutes_before = 0.0
        self.start(0)

    def start(self, step: int) -> None:
        """Start timing at optimizer step ``step``."""
        self.t_start, self.step_at_start = time.perf_counter(), step

    def minutes(self) -> float:
        """Training minutes so far, including those before a resume."""
        return self.minutes_before + (time.perf_counter() - self.t_start) / 60

    def steps_per_minute(self, step: int) -> float:
        """Optimizer steps per minute since :meth:`start`, at step ``step``."""
        return (step - self.step_at_start) / max(time.perf_counter() - self.t_start, 1e-9) * 60


class LogWindow:
    """What happened since the last log line: images seen, the taken steps' losses, the last gradient norm."""

    def __init__(self, device: torch.device) -> None:
        """An empty window whose loss sum lives on ``device`` (no host sync per step)."""
        self.device = device
        self.grad_norm: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.t_start, self.images, self.steps = time.perf_counter(), 0, 0
        self.loss_sum = torch.zeros((), device=self.device)

    def add(self, result: StepResult) -> None:
        """Count a step's images; a taken step's loss joins the mean."""
        self.grad_norm = result.grad_norm
        self.images += result.images
        if result.taken:
            self.loss_sum += result.loss
            self.steps += 1

    def means(self, info: DistInfo) -> tuple[float, float]:
        """The window's mean loss over every rank and the job's images per second."""
        loss = all_reduce_mean(self.loss_sum / max(1, self.steps), info).item()
        return loss, self.images * info.world_size / max(time.perf_counter() - self.t_start, 1e-9)


__all__ = ["NonFiniteLossError", "Trainer", "accumulate", "pretrain", "seed_everything"]
