"""Optimizer and learning-rate schedule: AdamW, no decay on 1-D parameters, warmup + cosine."""

from __future__ import annotations

import math

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
    """AdamW with weight decay off for biases, norms, 1-D parameters and the encoder's exemptions.

    Args:
        model: The method (its encoder's ``no_weight_decay()`` names are honoured).
        cfg: Optimizer settings.
        lr: Peak learning rate (see :func:`scaled_lr`).

    """
    skip: set[str] = set()
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "no_weight_decay"):
        skip = {f"encoder.{name}" for name in encoder.no_weight_decay()}
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Per-step linear warmup to ``peak`` then half-cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
