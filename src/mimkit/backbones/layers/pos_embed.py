"""Fixed 2-D sine-cosine positional embeddings, recomputed for any grid size."""

from __future__ import annotations

import functools

import torch
from timm.layers import build_sincos2d_pos_embed


@functools.lru_cache(maxsize=16)
def _sincos_cpu(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    return build_sincos2d_pos_embed((grid_h, grid_w), dim=dim, dtype=torch.float32)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """2-D sin-cos positional embedding as in MAE (He et al., 2022), for a ``grid_h x grid_w`` grid.

    Because it is a fixed function of the position, "interpolating" to another resolution is just
    evaluating it on the new grid, which keeps every embedding exactly on the sin-cos manifold.

    Args:
        grid_h: Rows of patches.
        grid_w: Columns of patches.
        dim: Embedding width; must be divisible by 4.
        device: Where to place the result.

    Returns:
        Tensor ``[1, grid_h * grid_w, dim]`` in float32, row-major over the grid.

    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    return _sincos_cpu(grid_h, grid_w, dim).to(device).unsqueeze(0)
