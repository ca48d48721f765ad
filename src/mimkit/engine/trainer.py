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
from mimkit.engine.distributed import DistInfo, all_reduce_mean, cleanup, init_distributed
from mimkit.engine.logging import RunLogger
from mimkit.engine.optim import build_optimizer, cosine_lr, scaled_lr
from mimkit.engine.precision import autocast, resolve_precision
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
        return _pretrain(cfg, resume, info)
    finally:
        cleanup(info)


def _pretrain(cfg: PretrainConfig, resume: str | None, info: DistInfo) -> Path:
    device, tc = info.device, cfg.train
    precision = resolve_precision(tc.precision, device)
    seed_everything(cfg.seed + info.rank)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    logger = RunLogger(run_dir, enabled=info.is_main)
    if info.is_main:
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))

    data = build_dataset(cfg.data, "train")
    loader = build_loader(data, cfg.data, cfg.optim.batch_size, train=True, seed=cfg.seed,
                          rank=info.rank, world_size=info.world_size)
    method = method_from_config(cfg).to(device)
    model = DistributedDataParallel(method) if info.distributed else method
    forward = torch.compile(model) if tc.compile else model

    peak_lr = scaled_lr(cfg.optim, info.world_size)
    optimizer = build_optimizer(method, cfg.optim, peak_lr)
    accum = cfg.optim.accum_steps
    steps_per_epoch = len(loader) // accum
    total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    step, epoch, start_batch, bad_steps = 0, 0, 0, 0

    ckpt = None
    if resume == "auto":
        ckpt = latest_checkpoint(ckpt_dir)
    elif resume:
        ckpt = resolve_checkpoint(resume)
    if ckpt is not None:
        load_weights(method, ckpt)
        state = load_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, start_batch)

    def checkpoint(batch_in_epoch: int) -> None:
        # Every rank's RNG state is gathered so that a resumed DDP run replays each shard exactly.
        states = [rng_state()]
        if info.distributed:
            states = [None] * info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if info.is_main:
            state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "rng": states, "total_steps": total_steps}
            save_checkpoint(ckpt_dir, step, method, state, tc.keep_last)

    if info.is_main:
        log.info("%s: %d images, %d steps of %d images, peak lr %.3g, %s on %s",
                 cfg.method["name"], len(data), total_steps,
                 cfg.optim.batch_size * accum * info.world_size, peak_lr, precision, device)
    bar = tqdm(total=total_steps, initial=step, disable=not (tc.progress and info.is_main),
               dynamic_ncols=True, desc=cfg.method["name"])
    try:
        method.train()
        t_start = time.perf_counter()
        t_log, seen, loss_sum, loss_n = t_start, 0, torch.zeros((), device=device), 0
        step_loss, step_finite = torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device)
        stop = step >= total_steps
        while not stop:
            loader.set_epoch(epoch, start_batch)
            micro = 0
            for batch_idx, (images, _) in enumerate(loader, start=start_batch):
                images = images.to(device, non_blocking=True)
                last_micro = micro == accum - 1
                sync = contextlib.nullcontext() if last_micro or not info.distributed else model.no_sync()
                with sync:
                    with autocast(device, precision):
                        out = forward(images)
                    (out.loss / accum).backward()
                # Every micro-batch must be finite: one NaN would poison the accumulated gradient.
                step_finite &= torch.isfinite(out.loss.detach().float())
                step_loss += out.loss.detach().float() / accum
                seen += images.shape[0]
                micro += 1
                if not last_micro:
                    continue
                micro = 0
                lr = cosine_lr(step, total_steps, warmup, peak_lr, cfg.optim.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                grad_norm = (torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
                             if cfg.optim.clip_grad > 0 else None)
                finite, step_finite = step_finite, torch.ones_like(step_finite)
                if grad_norm is not None:
                    finite = finite & torch.isfinite(grad_norm)
                # Every rank must take the same decision, or DDP would deadlock on the next step.
                if not bool(all_reduce_mean(finite.float(), info) == 1.0):
                    bad_steps += 1
                    step_loss.zero_()
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step, bad_steps)
                    if info.is_main:
                        logger.log(step, {"skipped_nonfinite": bad_steps})
                    if bad_steps >= tc.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{bad_steps} consecutive non-finite steps at step {step}; stopping. "
                            f"The last good checkpoint in {ckpt_dir} is intact; lower optim.base_lr, "
                            "set optim.clip_grad, or use train.precision=fp32."
                        )
                    continue
                bad_steps = 0
                loss_sum += step_loss
                loss_n += 1
                step_loss = torch.zeros((), device=device)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step(step)
                step += 1
                bar.update(1)

                if step % tc.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    loss = all_reduce_mean(loss_sum / max(1, loss_n), info).item()
                    ips = seen * info.world_size / max(now - t_log, 1e-9)
                    row = {"loss": loss, "lr": lr, "img_per_s": ips, "epoch": epoch + (batch_idx + 1) / len(loader),
                           "elapsed_min": (now - t_start) / 60, "skipped_images": loader.skipped}
                    row.update({k: float(v) for k, v in out.logs.items()})
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    logger.log(step, row)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                    t_log, seen, loss_sum, loss_n = now, 0, torch.zeros((), device=device), 0

                out_of_time = tc.max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= tc.max_minutes
                if step >= total_steps or out_of_time:
                    stop = True
                    checkpoint(batch_idx + 1)
                    if out_of_time and info.is_main:
                        log.info("train.max_minutes=%g reached at step %d; checkpoint saved", tc.max_minutes, step)
                    break
                if tc.ckpt_every_steps and step % tc.ckpt_every_steps == 0:
                    checkpoint(batch_idx + 1)
            else:
                # Micro-batches left over when an epoch is not a multiple of accum_steps are dropped.
                optimizer.zero_grad(set_to_none=True)
                epoch += 1
                start_batch = 0
                checkpoint(0)
                if loader.skipped and info.is_main:
                    log.warning("%d unreadable images skipped so far", loader.skipped)
    finally:
        bar.close()
        logger.close()
    if info.is_main:
        log.info("done: %d steps in %.1f min; run folder %s", step, (time.perf_counter() - t_start) / 60, run_dir)
    return run_dir
