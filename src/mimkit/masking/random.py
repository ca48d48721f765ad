"""MAE random masking by per-sample shuffling (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ShuffleMask(NamedTuple):
    """The result of masking a sequence of ``L`` tokens, keeping ``K`` of them.

    Attributes:
        keep_idx: ``[N, K]`` int64 indices of the visible tokens, in shuffled order.
        restore_idx: ``[N, L]`` int64; gathering ``cat(visible, masked)`` with it restores the
            original order.
        mask: ``[N, L]`` float32, 1 = masked, 0 = visible.

    """

    keep_idx: torch.Tensor
    restore_idx: torch.Tensor
    mask: torch.Tensor


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens for a ratio, as MAE counts them: ``int(L * (1 - ratio))``, at least 1."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> ShuffleMask:
    """Mask exactly ``L - K`` tokens per sample, chosen independently for each sample.

    Args:
        batch: N.
        num_tokens: L.
        mask_ratio: Fraction to mask, in (0, 1).
        device: Device of the returned tensors.
        generator: Optional RNG for reproducible masks (must live on ``device``).

    Returns:
        A :class:`ShuffleMask`.

    Example:
        >>> m = random_masking(2, 16, 0.75)
        >>> m.keep_idx.shape, int(m.mask.sum())
        (torch.Size([2, 4]), 24)

    """
    keep = num_kept(num_tokens, mask_ratio)
    # float32 noise: ties are impossible in practice and the ordering is independent of autocast.
    noise = torch.rand(batch, num_tokens, device=device, generator=generator, dtype=torch.float32)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, device=device, dtype=torch.float32)
    mask[:, :keep] = 0.0
    mask = torch.gather(mask, 1, restore)
    return ShuffleMask(shuffle[:, :keep], restore, mask)
