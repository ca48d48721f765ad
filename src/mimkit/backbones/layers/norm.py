"""Normalisation layers used by the transformer blocks."""

from __future__ import annotations

from torch import nn


def layer_norm(dim: int, **factory_kwargs: object) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6 as in ViT/MAE; accepts the device/dtype kwargs timm passes."""
    return nn.LayerNorm(dim, eps=1e-6, **factory_kwargs)
