"""Fixed 2-D sine-cosine positional embeddings, recomputed for any grid size."""

from __future__ import annotations

import functools

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.layers.pos_embed_sincos import freq_bands


@functools.lru_cache(maxsize=16)
def _sincos_cpu(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    return build_sincos2d_pos_embed((grid_h, grid_w), dim=dim, dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _sincos_spanning_cpu(grid_h: int, grid_w: int, dim: int, extent_h: int, extent_w: int) -> torch.Tensor:
    # Cell centres of the small grid placed over the reference grid's coordinates; timm's layout.
    ys = (torch.arange(grid_h, dtype=torch.float32) + 0.5) * extent_h / grid_h - 0.5
    xs = (torch.arange(grid_w, dtype=torch.float32) + 0.5) * extent_w / grid_w - 0.5
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).flatten(1).transpose(0, 1)  # [L, 2]
    pos = grid.unsqueeze(-1) * freq_bands(dim // 4, temperature=10000.0, step=1).unsqueeze(0)
    return torch.stack([torch.sin(pos), torch.cos(pos)], dim=1).flatten(1)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None,
              extent: tuple[int, int] | None = None) -> torch.Tensor:
    """2-D sin-cos positional embedding as in MAE (He et al., 2022), for a ``grid_h x grid_w`` grid.

    Because it is a fixed function of the position, another resolution is the same function evaluated
    at other coordinates. With ``extent`` (the grid the encoder is built for) a grid of another size
    spans the same coordinates, so a small crop of the whole image is encoded as the whole image,
    as DINO interpolates its position grid for local crops (Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers", ICCV 2021); without it the positions are ``0 .. grid - 1``.

    Args:
        grid_h: Rows of patches.
        grid_w: Columns of patches.
        dim: Embedding width; must be divisible by 4.
        device: Where to place the result.
        extent: ``(rows, columns)`` of the reference grid; None or equal to the grid: integer positions.

    Returns:
        Tensor ``[1, grid_h * grid_w, dim]`` in float32, row-major over the grid.

    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    if extent is None or tuple(extent) == (grid_h, grid_w):
        return _sincos_cpu(grid_h, grid_w, dim).to(device).unsqueeze(0)
    return _sincos_spanning_cpu(grid_h, grid_w, dim, *extent).to(device).unsqueeze(0)
