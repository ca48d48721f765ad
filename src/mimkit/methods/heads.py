"""Projection heads of the teacher-student methods.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP to an L2-normalised bottleneck, then a weight-normalised bias-free layer to ``out_dim`` logits.

    ``Linear(D, hidden) - GELU - Linear(hidden, hidden) - GELU - Linear(hidden, bottleneck)``, L2
    normalisation, then ``logits = x @ (g * v / |v|)^T``. With ``norm_last_layer`` the gain ``g`` is
    fixed to 1, so the logits are cosines (DINO's default, which its authors found to stabilise
    training). DINO freezes the last layer for its first epoch; the method does it by dropping
    the layer's gradients before the optimizer step (``last_layer_params``).

    Example:
        >>> head = DINOHead(64, 256, hidden_dim=128, bottleneck_dim=32)
        >>> head(torch.randn(4, 64)).shape
        torch.Size([4, 256])

    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True) -> None:
        """Build the head: the MLP truncated-normal (std 0.02), the last layer ``nn.Linear``'s default, as DINO's."""
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))  # what nn.Linear does
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised float32 bottleneck ``[N, bottleneck]`` of features ``[N, D]`` (iBOT's patch path
        shares it).
        """
        return F.normalize(self.mlp(x).float(), dim=-1, eps=1e-6)

    def last_layer(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[..., out_dim]`` of normalised bottleneck vectors ``z [..., bottleneck]``.

        Autocast is off here: the teacher divides these cosines by a temperature of 0.04, where one
        bf16 rounding step near 1 (2^-8) would move its distribution by a tenth of a nat.
        """
        with torch.autocast(z.device.type, enabled=False):
            w = self.last_g.float() * F.normalize(self.last_v.float(), dim=1, eps=1e-6)
            return F.linear(z.float(), w)

    def last_layer_params(self) -> list[nn.Parameter]:
        """The weight-normalised last layer's parameters (DINO's frozen ones)."""
        return [self.last_v, self.last_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, out_dim]`` of features ``[N, in_dim]``."""
        return self.last_layer(self.embed(x))


__all__ = ["DINOHead"]
