"""Block masks over a ``height x width`` token grid, as batched pure functions.

- :func:`block_masks`: BEiT's block-wise masking (Bao et al., "BEiT: BERT Pre-Training of Image
  Transformers", ICLR 2022, Algorithm 1), with iBOT's per-image masking probability and ratio range
  (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022).
- :func:`inverse_block_masks`: data2vec 2.0's inverse block mask (Baevski et al., "Efficient
  Self-supervised Learning with Contextualized Target Representations for Vision, Speech and
  Language", ICML 2023): square blocks stay visible, everything else is masked.

Every mask is ``[N, height * width]`` in row-major order, True (or 1) = masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Ratio = float | Sequence[float]
"""A masked fraction: one float in (0, 1), or a range ``(lo, hi)`` with ``0 < lo <= hi < 1``."""


def _ratio_range(ratio: Ratio, name: str = "ratio") -> tuple[float, float, bool]:
    """``(lo, hi, is_range)`` of a :data:`Ratio`, or ValueError naming argument ``name`` and its valid range."""
    rule = "a float in (0, 1) or a range (lo, hi) with 0 < lo <= hi < 1"
    if isinstance(ratio, int | float) and not isinstance(ratio, bool):
        lo = hi = float(ratio)
        is_range = False
    elif isinstance(ratio, Sequence) and not isinstance(ratio, str) and len(ratio) == 2 \
            and all(isinstance(r, int | float) and not isinstance(r, bool) for r in ratio):
        lo, hi = float(ratio[0]), float(ratio[1])
        is_range = True
    else:
        raise ValueError(f"{name} must be {rule}, got {ratio!r}")
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"{name} must be {rule}, got {ratio!r}")
    return lo, hi, is_range


def _check_grid(n: int, height: int, width: int) -> None:
    """ValueError unless ``n >= 0`` and the grid has at least one row and one column."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")


def _num_masked(ratio: float, total: int) -> int:
    """``round(ratio * total)`` kept within ``[1, total - 1]``: a mask hides something and shows something."""
    return min(total - 1, max(1, int(round(ratio * total))))


def _block_mask_one(
    height: int, width: int, num_masked: int, min_block: int, max_aspect: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """BEiT's Algorithm 1 for one image: ``[height, width]`` bool with at most ``num_masked`` cells set.

    Blocks of area in ``[min_block, max(min_block, remaining)]`` and aspect ratio log-uniform in
    ``[1 / max_aspect, max_aspect]`` are placed uniformly at random; a block that would overshoot the
    target, or adds nothing, is rejected. Sampling stops at the target or after ``100 * num_masked``
    attempts. The random numbers come one at a time from ``generator`` (the global RNG when None),
    in the order: area, aspect, then top and left for a block that fits.
    """
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
        if 0 < new <= remaining:
            patch[:] = True
    return mask


def _beit_mask(
    height: int, width: int, ratio: float, min_block: int, max_aspect: float, generator: torch.Generator | None,
) -> torch.Tensor:
    """``[height * width]`` bool with exactly :func:`_num_masked` cells: BEiT's blocks, then random cells.

    When the blocks stall short of the target (possible on small grids or with a large
    ``min_block``), the shortfall is filled with cells drawn by one ``randperm`` of the free cells.
    """
    num_masked = _num_masked(ratio, height * width)
    mask = _block_mask_one(height, width, num_masked, min_block, max_aspect, generator).flatten()
    short = num_masked - int(mask.sum())
    if short > 0:
        free = torch.nonzero(~mask).squeeze(1)
        mask[free[torch.randperm(free.numel(), generator=generator)[:short]]] = True
    return mask


def block_masks(
    n: int,
    height: int,
    width: int,
    ratio: Ratio,
    *,
    mask_prob: float = 1.0,
    min_block: int = 4,
    max_aspect: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT block masks for a batch, each image masked with probability ``mask_prob`` at its own ratio.

    A masked image gets exactly ``round(r * H * W)`` masked cells (kept within ``[1, H * W - 1]``),
    where ``r`` is ``ratio`` or, for a range ``(lo, hi)``, ``lo + (hi - lo) * u`` with ``u`` uniform
    in ``[0, 1)`` per image, as iBOT draws it. The cells are rectangles placed by BEiT's Algorithm 1
    (areas of at least ``min_block`` cells, aspect ratios in ``[1 / max_aspect, max_aspect]``); when
    the rectangles stall short of the count, random single cells make up the rest. An image that is
    not masked is all False.

    Random numbers come from ``generator`` (the global RNG when None), in this order: when ``ratio``
    is a range or ``mask_prob < 1``, first one ``[N, 2]`` uniform draw (column 0 decides whether
    image ``i`` is masked, ``u[i, 0] < mask_prob``; column 1 is its ``u``), then the masked images'
    blocks one image after another. A float ratio with ``mask_prob == 1`` draws nothing up front, so
    it gives, image by image, what ``block_masks(1, ...)`` gives in turn; and iBOT's masks are
    ``block_masks(n, h, w, tuple(mask_ratio), mask_prob=mask_prob, min_block=mask_min_block)``.

    Args:
        n: Batch size N (>= 0).
        height: Grid rows H (>= 1).
        width: Grid columns W (>= 1).
        ratio: Fraction of cells to mask: a float in (0, 1), or a range ``(lo, hi)`` with
            ``0 < lo <= hi < 1`` drawn uniformly per image.
        mask_prob: Probability in [0, 1] that an image is masked at all.
        min_block: Smallest block area in cells (>= 1).
        max_aspect: Largest block aspect ratio (>= 1).
        generator: Optional CPU RNG; the global RNG when None.

    Returns:
        ``[N, H * W]`` bool on the CPU, True = masked.

    Raises:
        ValueError: An argument outside its valid range (named in the message).

    Example:
        >>> m = block_masks(3, 14, 14, (0.1, 0.5), mask_prob=0.5, generator=torch.Generator().manual_seed(0))
        >>> m.shape, m.dtype
        (torch.Size([3, 196]), torch.bool)

    """
    _check_grid(n, height, width)
    lo, hi, is_range = _ratio_range(ratio)
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if not max_aspect >= 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    out = torch.zeros(n, height * width, dtype=torch.bool)
    if is_range or mask_prob < 1.0:
        draws = torch.rand(n, 2, generator=generator)
        chosen = (draws[:, 0] < mask_prob).tolist()  # compared as iBOT does, in float32
        fractions = draws[:, 1].tolist()
    else:
        chosen, fractions = [True] * n, [0.0] * n
    for i in range(n):
        if chosen[i]:
            out[i] = _beit_mask(height, width, lo + (hi - lo) * fractions[i], min_block, max_aspect, generator)
    return out


def inverse_block_masks(
    n: int,
    height: int,
    width: int,
    ratio: Ratio,
    *,
    block_size: int = 3,
    adjust: float = 0.07,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Data2vec 2.0's inverse block masks: random square blocks stay visible, the rest is masked.

    For each image, ``floor(L * (1 - r + adjust) / block_size**2)`` block centres are drawn uniformly
    (with replacement) over the ``L = H * W`` cells, and each centre shows the ``block_size`` square
    around it (rows and columns ``c - block_size // 2`` to ``c + (block_size - 1) // 2``, clipped at
    the border). ``adjust`` (data2vec 2.0's ``mask_prob_adjust``) draws more blocks than ``1 - r``
    needs, making up for their overlaps. The visible set is then corrected at random to exactly
    ``L - M`` cells, ``M = round(r * L)`` kept within ``[1, L - 1]``: surplus visible cells are hidden
    uniformly at random, or missing ones shown uniformly at random among the hidden cells, as
    data2vec 2.0 does.
    With few centres (small grids) the blocks cover little and the correction adds scattered cells.

    ``r`` is ``ratio``, or for a range ``(lo, hi)``, ``lo + (hi - lo) * u`` with ``u`` uniform in
    ``[0, 1)`` per image. Everything is batched; random numbers come from ``generator`` in this
    order: the ``[N]`` ratio draws (for a range only), the ``[N, C]`` centres, the ``[N, L]``
    tie-breaking noise of the correction.

    Args:
        n: Batch size N (>= 0).
        height: Grid rows H (>= 1).
        width: Grid columns W (>= 1).
        ratio: Fraction of cells to mask: a float in (0, 1), or a range ``(lo, hi)`` with
            ``0 < lo <= hi < 1`` drawn uniformly per image.
        block_size: Side of a visible block in cells, in ``[1, min(H, W)]`` (data2vec 2.0: 3 on
            a 14 x 14 grid at ratio 0.8).
        adjust: Extra fraction (>= 0) of the grid to cover with blocks before the correction
            (data2vec 2.0: 0.07).
        device: Device of the result; the generator's device when None (the CPU without one).
        generator: Optional RNG on ``device``; the global RNG when None.

    Returns:
        ``[N, H * W]`` bool, True = masked; exactly ``M`` per row.

    Raises:
        ValueError: An argument outside its valid range (named in the message).

    Example:
        >>> m = inverse_block_masks(2, 14, 14, 0.8, generator=torch.Generator().manual_seed(0))
        >>> m.shape, m.sum(1).tolist()
        (torch.Size([2, 196]), [157, 157])

    """
    _check_grid(n, height, width)
    lo, hi, is_range = _ratio_range(ratio)
    if not 1 <= block_size <= min(height, width):
        raise ValueError(f"block_size must be in [1, min(height, width)] = [1, {min(height, width)}], "
                         f"got {block_size}")
    if not adjust >= 0.0:
        raise ValueError(f"adjust must be >= 0, got {adjust}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    total, area = height * width, block_size * block_size
    # per-image ratios and counts, in float64 on the CPU so a float ratio counts as Python's round does
    if is_range:
        u = torch.rand(n, generator=generator, device=device).to("cpu", torch.float64)
        ratios = lo + (hi - lo) * u
    else:
        ratios = torch.full((n,), lo, dtype=torch.float64)
    num_masked = torch.round(ratios * total).long().clamp(min=1).clamp(max=total - 1)  # as _num_masked
    num_centres = torch.floor(total * (1.0 - ratios + adjust) / area).long()
    most = int(math.floor(total * (1.0 - lo + adjust) / area))  # the smallest ratio needs the most centres
    # centres: drawn for the largest count, the surplus of an image with fewer switched off
    centres = torch.randint(0, total, (n, most), generator=generator, device=device)
    live = torch.arange(most, device=device) < num_centres.to(device)[:, None]
    seeds = torch.zeros(n, total, dtype=torch.float32, device=device).scatter_add_(1, centres, live.float())
    # each seed shows the block_size square around it: a max-pool over the seed grid, padded so that
    # cell y sees the seeds in [y - (block_size - 1) // 2, y + block_size // 2]
    pad = ((block_size - 1) // 2, block_size // 2)
    grid = F.pad((seeds > 0).float().view(n, 1, height, width), (pad[0], pad[1], pad[0], pad[1]))
    shown = F.max_pool2d(grid, block_size, stride=1).view(n, total) > 0
    # exact count: keep the L - M visible cells of highest score; block cells outrank all others
    score = shown.float() * 2.0 + torch.rand(n, total, generator=generator, device=device)
    order = score.argsort(dim=1, descending=True)
    keep_sorted = torch.arange(total, device=device) < (total - num_masked).to(device)[:, None]
    visible = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return ~visible
