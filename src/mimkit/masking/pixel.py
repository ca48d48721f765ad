"""Pixel-block grid masks whose block size is independent of any patch size, for convolutional
encoders that see the whole image (the hybrid CvT-MAE).
"""

from __future__ import annotations

import torch

from mimkit.masking.block import block_masks


def pixel_block_mask(
    batch: int,
    height: int,
    width: int,
    block_size: int,
    mask_ratio: float,
    mode: str = "random",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A binary image mask made of square ``block_size`` pixel blocks.

    Exactly ``round(ratio * B)`` of the ``B = (H / s) * (W / s)`` blocks are masked per sample,
    chosen independently per sample, either uniformly (``random``) or as BEiT-style rectangles of
    blocks (``block``).

    Args:
        batch: N.
        height: Image height H in pixels (divisible by ``block_size``).
        width: Image width W in pixels (divisible by ``block_size``).
        block_size: Side s of a mask block in pixels.
        mask_ratio: Fraction of blocks to mask, in (0, 1).
        mode: ``random`` or ``block``.
        device: Device of the result.
        generator: Optional RNG (CPU for ``block``, on ``device`` for ``random``).

    Returns:
        ``[N, 1, H, W]`` float32, 1 = masked, 0 = visible.

    """
    if height % block_size or width % block_size:
        raise ValueError(f"image {height}x{width} is not divisible by mask block size {block_size}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    gh, gw = height // block_size, width // block_size
    if mode == "random":
        num = gh * gw
        masked = min(num - 1, max(1, int(round(mask_ratio * num))))
        noise = torch.rand(batch, num, device=device, generator=generator, dtype=torch.float32)
        rank = noise.argsort(dim=1).argsort(dim=1)
        grid = (rank < masked).float()
    elif mode == "block":
        grid = block_masks(batch, gh, gw, mask_ratio, generator=generator).float().to(device)
    else:
        raise ValueError(f"mask mode must be 'random' or 'block', got {mode!r}")
    grid = grid.view(batch, 1, gh, gw)
    return grid.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
