"""The one training loop, shared by every method, on a CPU, one GPU or under torchrun."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mimkit.config import PretrainConfig, to_yaml
from mimkit.data import build_dataset, build_loader
from mimkit.engine.checkpoint import (
    latest_checkpoint,
    load_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.engine.distributed import DistInfo, all_reduce_mean, broadcast_from_main, cleanup, init_distributed
from mimkit.engine.logging import RunLogger
from mimkit.engine.optim import build_optimizer, cosine_lr, scaled_lr
from mimkit.engine.precision import autocast, resolve_precision
from mimkit.methods import PretrainOutput
from mimkit.models import method_from_config

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns the run folder.

    Args:
        cfg: A validated config (see :func:`mimkit.config.load_config`).
        resume: None for a fresh run, ``auto`` for the newest complete checkpoint in the run
            folder (a fresh start if there is none), or a checkpoint path.

    Returns:
        The run folder, holding ``config.yaml``, ``metrics.jsonl``, ``tb/`` and ``checkpoints/``.

    """
    info = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, info).fit(resume)
    finally:
        cleanup(info)


class Trainer:
    """Everything one pre-training run holds; :meth:`fit` is the loop, the other methods its steps."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo) -> None:
        """Build data, method, optimizer and schedule for ``cfg`` on this process's device."""
        self.cfg, self.info, tc = cfg, info, cfg.train
        self.device = info.device
        self.precision = resolve_precision(tc.precision, self.device)
        seed_everything(cfg.seed + info.rank)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        # Model and data are checked before the run folder is touched: a bad setting leaves nothing behind.
        self.method = method_from_config(cfg).to(self.device)
        self.method.check_image_size(cfg.data.img_size, cfg.data.img_size)
        self.data = build_dataset(cfg.data, "train")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = RunLogger(self.run_dir, enabled=info.is_main)
        if info.is_main:
            (self.run_dir / CONFIG_FILE).write_text(to_yaml(cfg))

        self.loader = build_loader(self.data, cfg.data, cfg.optim.batch_size, train=True, seed=cfg.seed,
                                   rank=info.rank, world_size=info.world_size)
        self.model = DistributedDataParallel(self.method) if info.distributed else self.method
        self.forward = torch.compile(self.model) if tc.compile else self.model

        self.peak_lr = scaled_lr(cfg.optim, info.world_size)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.peak_lr)
        self.accum = cfg.optim.accum_steps
        steps_per_epoch = len(self.loader) // self.accum
        self.total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
        self.warmup = self.warmup_cfg = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.max_steps = self.total_steps
        self.step, self.epoch, self.start_batch, self.bad_steps = 0, 0, 0, 0
        self.grad_norm: torch.Tensor | None = None
        self.t_start, self.step_at_start, self.minutes_before = time.perf_counter(), 0, 0.0
        self._reset_window()
        self._reset_accumulation()

    def _reset_window(self) -> None:
        """Start a new logging window (images seen and losses since the last log line)."""
        self.t_log, self.seen, self.loss_n = time.perf_counter(), 0, 0
        self.loss_sum = torch.zeros((), device=self.device)

    def _reset_accumulation(self) -> None:
        self.step_loss = torch.zeros((), device=self.device)
        self.step_finite = torch.ones((), dtype=torch.bool, device=self.device)

    def resume(self, resume: str | None) -> None:
        """Load weights, optimizer, position and RNG state from a checkpoint (``auto`` = newest complete)."""
        ckpt = latest_checkpoint(self.ckpt_dir) if resume == "auto" else resolve_checkpoint(resume) if resume else None
        if ckpt is None:
            return
        load_weights(self.method, ckpt)
        state = load_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.minutes_before = state.get("train_minutes", 0.0)
        set_rng_state(state["rng"][min(self.info.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.step, self.epoch, self.start_batch)

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

    def accumulate(self, images: torch.Tensor, last_micro: bool) -> PretrainOutput:
        """Forward and backward one micro-batch, adding its share to the step's gradient."""
        images = images.to(self.device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro-batch of a step.
        sync = contextlib.nullcontext() if last_micro or not self.info.distributed else self.model.no_sync()
        with sync:
            with autocast(self.device, self.precision):
                out = self.forward(images)
            (out.loss / self.accum).backward()
        # Every micro-batch must be finite: one NaN would poison the accumulated gradient.
        self.step_finite &= torch.isfinite(out.loss.detach().float())
        self.step_loss += out.loss.detach().float() / self.accum
        self.seen += images.shape[0]
        return out

    def optimizer_step(self, lr: float) -> bool:
        """Clip, check, and apply the accumulated gradient at ``lr`` (the norm goes to ``self.grad_norm``).

        Returns:
            Whether the step was taken (False: skipped as non-finite).

        Raises:
            NonFiniteLossError: After ``train.max_bad_steps`` skipped steps in a row.

        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.cfg.optim.clip_grad
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip) if clip > 0 else None
        finite = self.step_finite if self.grad_norm is None else self.step_finite & torch.isfinite(self.grad_norm)
        step_loss = self.step_loss
        self._reset_accumulation()
        # Every rank must take the same decision, or DDP would deadlock on the next step.
        if not bool(all_reduce_mean(finite.float(), self.info) == 1.0):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_nonfinite()
            return False
        self.bad_steps = 0
        self.loss_sum += step_loss
        self.loss_n += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(self.step)
        self.step += 1
        return True

    def _skip_nonfinite(self) -> None:
        self.bad_steps += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", self.step, self.bad_steps)
        if self.info.is_main:
            self.logger.log(self.step, {"skipped_nonfinite": self.bad_steps})
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive non-finite steps at step {self.step}; stopping. "
                f"The last good checkpoint in {self.ckpt_dir} is intact; lower optim.base_lr, "
                "set optim.clip_grad, or use train.precision=fp32."
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
        self.logger.log(self.step, row)
        self._reset_window()
        return f"loss={loss:.4f} img/s={ips:.0f} lr={lr:.2e}"

    def fit(self, resume: str | None = None) -> Path:
        """Run (or resume) the schedule to its end or to ``train.max_minutes``; returns the run folder."""
        cfg, tc, info = self.cfg, self.cfg.train, self.info
        self.resume(resume)
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
        stop = self.step >= self.total_steps
        try:
            while not stop:
                self.loader.set_epoch(self.epoch, self.start_batch)
                for i, (batch_idx, (images, _)) in enumerate(enumerate(self.loader, start=self.start_batch)):
                    out = self.accumulate(images, last_micro=(i + 1) % self.accum == 0)
                    if (i + 1) % self.accum:
                        continue
                    self.fit_schedule_to_budget()
                    bar.total = self.total_steps
                    lr = cosine_lr(self.step, self.total_steps, self.warmup, self.peak_lr, cfg.optim.min_lr)
                    if not self.optimizer_step(lr):
                        continue
                    bar.update(1)
                    if self.step % tc.log_every == 0 or self.step == self.total_steps:
                        epoch_pos = self.epoch + (batch_idx + 1) / len(self.loader)
                        bar.set_postfix_str(self.log_step(out, lr, epoch_pos))
                    out_of_time = self.out_of_time()
                    if self.step >= self.total_steps or out_of_time:
                        stop = True
                        self.checkpoint(batch_idx + 1)
                        if out_of_time and info.is_main:
                            log.info("time limit reached after %.1f min at step %d; checkpoint saved",
                                     self.minutes(), self.step)
                        break
                    if tc.ckpt_every_steps and self.step % tc.ckpt_every_steps == 0:
                        self.checkpoint(batch_idx + 1)
                else:
                    # Micro-batches left over when an epoch is not a multiple of accum_steps are dropped.
                    self.optimizer.zero_grad(set_to_none=True)
                    self._reset_accumulation()
                    self.epoch, self.start_batch = self.epoch + 1, 0
                    self.checkpoint(0)
                    if self.loader.skipped and info.is_main:
                        log.warning("%d unreadable images skipped so far", self.loader.skipped)
        finally:
            bar.close()
            self.logger.close()
        if info.is_main:
            log.info("done: %d steps in %.1f min; run folder %s", self.step, self.minutes(), self.run_dir)
        return self.run_dir
