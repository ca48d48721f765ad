"""Mixing several images into one input, as pure functions: MixMAE's pairs and MixedAE's groups.

- Liu et al., "MixMAE: Mixed and Masked Autoencoder for Efficient Pretraining of Hierarchical Vision
  Transformers", CVPR 2023: image ``i`` is paired with ``i' = N - 1 - i``; one binary mask per step,
  shared by the batch, drawn on the encoder's *final-stage* grid and upsampled to every earlier
  stage, so every patch-merging group comes from one image. ``mixed[i] = x[i] * (1 - m) + x[i'] * m``.
- Chen et al., "Mixed Autoencoder for Self-supervised Visual Representation Learning", CVPR 2023
  (MixedAE): groups of ``G = 1 / r`` images mixed into one sample, each image at exactly ``r * L``
  positions (a balanced random assignment per group).

Every function here is exact: each position of a mixed input comes from exactly one image, and
un-mixing recovers the inputs bit for bit (tested).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def pair_partner(batch: int) -> torch.Tensor:
    """MixMAE's pairing ``i -> N - 1 - i`` as indices ``[N]`` (an involution; ``N`` must be even).

    Raises:
        ValueError: ``batch`` odd or below 2 (the middle image would be paired with itself).

    """
    if batch < 2 or batch % 2:
        raise ValueError(f"mixing images in pairs needs an even batch of at least 2 images, got {batch}")
    return torch.arange(batch - 1, -1, -1)


def pair_mask(grid: tuple[int, int], ratio: float = 0.5, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One mixing mask for the whole batch: exactly ``floor(L * ratio)`` of the ``L`` cells set.

    Args:
        grid: The final-stage grid ``(h, w)``, ``L = h * w``.
        ratio: Fraction of cells taken from the partner image, in (0, 1).
        device: Device of the result.
        generator: Optional RNG (on ``device``) for a reproducible mask.

    Returns:
        ``[h, w]`` int64 labels: 0 = the sample's own image, 1 = its partner's.

    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"the mixing ratio must be in (0, 1), got {ratio}")
    length = grid[0] * grid[1]
    count = math.floor(length * ratio + 1e-9)  # 100 x 0.29 is 28.999...: floor of the exact product
    if not 0 < count < length:
        raise ValueError(f"a {grid[0]}x{grid[1]} grid at ratio {ratio} leaves one image no cell; use a larger grid")
    order = torch.randperm(length, device=device, generator=generator)
    labels = torch.zeros(length, dtype=torch.long, device=device)
    labels[order[:count]] = 1
    return labels.view(grid)


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of integer labels ``[..., h, w]`` to ``[..., H, W]``.

    When ``H / h`` and ``W / w`` are integers every output cell copies exactly one input cell, so a
    2x2 patch-merging group of an earlier stage never straddles two labels.
    """
    lead = labels.shape[:-2]
    flat = labels.reshape(-1, 1, *labels.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").long().view(*lead, *size)


def mix_pairs(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``x[i] * (1 - m) + x[N - 1 - i] * m``: each sample keeps its own content where ``m`` is 0.

    Args:
        x: ``[N, C, H, W]`` images or maps (``N`` even).
        labels: ``[H, W]`` (shared) or ``[N, H, W]`` 0/1 labels on ``x``'s grid; per-sample labels
            must be equal for the two samples of a pair, or the mix is not invertible.

    Returns:
        The mixed tensor, ``x``'s shape and dtype. Mixing twice with the same labels gives ``x``
        back (:func:`unmix_pairs` is this function).

    """
    partner = pair_partner(x.shape[0]).to(x.device)
    m = labels.bool().view(-1, 1, *labels.shape[-2:]) if labels.ndim == 3 else labels.bool().view(1, 1, *labels.shape)
    return torch.where(m, x[partner], x)


#: Un-mixing a pair is mixing it again: position by position, the two samples swap back.
unmix_pairs = mix_pairs


class GroupMix(NamedTuple):
    """A balanced assignment of ``L`` token positions to the ``G`` images of each group.

    Attributes:
        source: ``[N / G, L]`` int64: which image of the group (0 .. G-1) sits at each position.
        keep_idx: ``[N, r * L]`` int64: the positions image ``n`` holds (sorted), group by group.
        restore_idx: ``[N, L]`` int64: gathering ``cat(kept tokens, other tokens)`` with it restores
            the image's token order (the layout of :class:`~mimkit.masking.ShuffleMask`).
        mask: ``[N, L]`` float32, 1 where image ``n`` is hidden (another image of its group sits there).

    """

    source: torch.Tensor
    keep_idx: torch.Tensor
    restore_idx: torch.Tensor
    mask: torch.Tensor


def group_assignment(batch: int, group: int, length: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> GroupMix:
    """MixedAE's balanced mixing: per group of ``G`` consecutive images, a random permutation of the
    ``L`` positions cut into ``G`` runs of ``L / G``, one per image.

    Args:
        batch: ``N``, a multiple of ``group``.
        group: ``G = 1 / r`` images per mixed sample (2 or more).
        length: ``L`` token positions, a multiple of ``group``.
        device: Device of the results.
        generator: Optional RNG (on ``device``).

    Returns:
        A :class:`GroupMix`.

    """
    if group < 2:
        raise ValueError(f"a mixed sample needs at least 2 images, got group {group}")
    if batch % group or batch == 0:
        raise ValueError(f"the batch ({batch} images) must be a positive multiple of the group size {group}")
    if length % group:
        raise ValueError(f"{length} token positions cannot be shared equally by {group} images")
    per = length // group
    groups = batch // group
    noise = torch.rand(groups, length, device=device, generator=generator, dtype=torch.float32)
    order = torch.argsort(noise, dim=1)  # [B/G, L]: positions, cut into G runs of `per`
    source = torch.empty(groups, length, dtype=torch.long, device=device)
    owner = torch.arange(group, device=device).repeat_interleave(per).expand(groups, -1)
    source.scatter_(1, order, owner)
    keep = order.view(groups, group, per).sort(dim=-1).values.reshape(batch, per)
    mask = torch.ones(batch, length, device=device, dtype=torch.float32)
    mask.scatter_(1, keep, 0.0)
    # kept positions first, then the others, each in position order: argsort of (mask, position)
    position = torch.arange(length, device=device).expand(batch, -1)
    shuffle = torch.argsort(mask * length + position, dim=1)
    return GroupMix(source, keep, torch.argsort(shuffle, dim=1), mask)


def mix_groups(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Gather one mixed sample per group: ``mixed[b, p] = tokens[b * G + source[b, p], p]``.

    Args:
        tokens: ``[N, L, D]`` token sequences of ``N = (N / G) * G`` images.
        source: ``[N / G, L]`` from :func:`group_assignment`.

    Returns:
        ``[N / G, L, D]``.

    """
    groups, length = source.shape
    group = tokens.shape[0] // groups
    if group * groups != tokens.shape[0] or tokens.shape[1] != length:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a group assignment {tuple(source.shape)}")
    rows = source + group * torch.arange(groups, device=source.device).unsqueeze(1)  # [B/G, L]
    cols = torch.arange(length, device=source.device).expand(groups, -1)
    return tokens[rows, cols]


def unmix_groups(mixed: torch.Tensor, mix: GroupMix) -> torch.Tensor:
    """Each image's own tokens out of the mixed samples: ``[N / G, L, D]`` to ``[N, r * L, D]``.

    Image ``n``'s tokens at ``mix.keep_idx[n]``, in that order; scattering them back into a sequence
    of ``L`` at those positions inverts :func:`mix_groups` for that image.
    """
    groups = mix.source.shape[0]
    group = mix.keep_idx.shape[0] // groups
    rows = torch.arange(groups, device=mixed.device).repeat_interleave(group).unsqueeze(1)  # [N, 1]
    return mixed[rows, mix.keep_idx]


__all__ = ["GroupMix", "group_assignment", "mix_groups", "mix_pairs", "pair_mask", "pair_partner", "unmix_groups",
           "unmix_pairs", "upsample_labels"]
