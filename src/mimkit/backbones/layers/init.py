"""Weight initialisation shared by the hierarchical backbones."""

from __future__ import annotations

from torch import nn


def trunc_normal_init(m: nn.Module) -> None:
    """Timm's transformer initialisation: linear weights ~ truncated N(0, 0.02), zero biases, unit LayerNorm.

    Use as ``model.apply(trunc_normal_init)``.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
