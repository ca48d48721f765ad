"""BEiT block-wise masking (Bao et al., "BEiT: BERT Pre-Training of Image Transformers",
ICLR 2022, Algorithm 1).
"""

from __future__ import annotations

import math

import torch


def _block_mask_one(
    height: int, width: int, num_masked: int, min_block: int, max_aspect: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(1.0 / max_aspect), math.log(max_aspect))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    attempts = 0
    while int(mask.sum()) < num_masked and attempts < 100 * num_masked:
        attempts += 1
        remaining = num_masked - int(mask.sum())
        target = uniform(min_block, max(min_block, remaining))
        aspect = math.exp(uniform(*log_aspect))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if not (1 <= h <= height and 1 <= w <= width):
            continue
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        patch = mask[top : top + h, left : left + w]
        new = int((~patch).sum())
        # BEiT rejects a block that would overshoot the target; it keeps sampling smaller ones.
        if 0 < new <= remaining:
            patch[:] = True
    return mask


def block_masking(
    batch: int,
    height: int,
    width: int,
    mask_ratio: float,
    min_block: int = 4,
    max_aspect: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask rectangular blocks of a ``height x width`` grid until exactly ``ratio`` is covered.

    BEiT's algorithm samples blocks of area >= ``min_block`` with aspect ratios in
    ``[1/max_aspect, max_aspect]``; when it stalls short of the target (possible on small grids),
    the remainder is filled with random single cells so every sample masks exactly
    ``round(ratio * H * W)`` cells and batches stay rectangular for token-dropping encoders.

    Args:
        batch: N.
        height: Grid rows.
        width: Grid columns.
        mask_ratio: Fraction to mask, in (0, 1).
        min_block: Smallest block area in cells.
        max_aspect: Largest block aspect ratio.
        generator: Optional CPU RNG for reproducibility.

    Returns:
        ``[N, height * width]`` float32, 1 = masked.

    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    total = height * width
    num_masked = min(total - 1, max(1, int(round(mask_ratio * total))))
    out = torch.zeros(batch, total, dtype=torch.float32)
    for i in range(batch):
        m = _block_mask_one(height, width, num_masked, min_block, max_aspect, generator).flatten()
        short = num_masked - int(m.sum())
        if short > 0:
            free = torch.nonzero(~m).squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=generator)[:short]]
            m[pick] = True
        out[i] = m.float()
    return out
