"""Optimizer and learning-rate schedule: AdamW, no decay on 1-D parameters, warmup + cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mimkit.config import OptimConfig


def scaled_lr(cfg: OptimConfig, world_size: int = 1) -> float:
    """Peak learning rate by the linear scaling rule: ``base_lr x effective_batch / 256``.

    The effective batch is ``batch_size x accum_steps x world_size`` (Goyal et al., 2017).
    """
    return cfg.base_lr * cfg.batch_size * cfg.accum_steps * world_size / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the method's :meth:`~mimkit.methods.PretrainMethod.param_groups`.

    Each group's starting weight decay is kept as ``weight_decay_start`` so that
    :func:`apply_schedules` can move it towards a ``weight_decay_end``; every value a group holds is
    a number, so the optimizer's state dict stays loadable with ``weights_only=True``.

    Args:
        model: The method (a module without ``param_groups`` gets timm's split of its parameters).
        cfg: Optimizer settings.
        lr: Peak learning rate (see :func:`scaled_lr`).

    """
    if hasattr(model, "param_groups"):
        groups = model.param_groups(cfg.weight_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
        group["weight_decay_start"] = group.get("weight_decay", cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, progress: float) -> None:
    """Set every group's lr (``lr x lr_scale``) and, where it has a ``weight_decay_end``, its decay.

    Args:
        optimizer: Built by :func:`build_optimizer`.
        lr: The scheduled learning rate of this step.
        progress: ``step / total_steps`` in [0, 1], for the weight-decay cosine.

    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if "weight_decay_end" in group:
            start, end = group["weight_decay_start"], group["weight_decay_end"]
            group["weight_decay"] = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Per-step linear warmup to ``peak`` then half-cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run: linear warmup to ``peak_lr``, then a cosine to ``min_lr``.

    Under ``train.budget_minutes`` the length is re-estimated as the run goes (:meth:`fitted`); it
    never exceeds ``max_steps``, the length ``train.epochs`` gives.
    """

    total_steps: int
    warmup: int
    peak_lr: float
    min_lr: float
    max_steps: int

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (counting from 0)."""
        return cosine_lr(step, self.total_steps, self.warmup, self.peak_lr, self.min_lr)

    def fitted(self, total_steps: int) -> Schedule:
        """The schedule with ``total_steps`` steps (at most ``max_steps``); the warmup is cut to a quarter
        of them if longer.

        A short budget may not even cover ``optim.warmup_epochs``: cutting the warmup lets the run
        still reach its peak lr and anneal. It is never lengthened again, or the lr would dip back.
        """
        total_steps = min(total_steps, self.max_steps)
        return replace(self, total_steps=total_steps, warmup=min(self.warmup, total_steps // 4))
