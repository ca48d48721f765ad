"""Reconstruction losses shared by the masked-autoencoder methods."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images into non-overlapping patches.

    Args:
        images: ``[N, C, H, W]`` with H and W divisible by ``patch``.
        patch: Patch side p.

    Returns:
        ``[N, L, p*p*C]`` with ``L = (H/p)*(W/p)``, row-major, pixels in (p, p, C) order as MAE.

    """
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(n, c, gh, patch, gw, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, L, p*p*C]`` to ``[N, C, gh*p, gw*p]``."""
    n = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(n, gh, gw, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * patch, gw * patch)


def patch_norm_stats(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std ``[N, L, 1]`` of patch pixels ``[N, L, D]`` (float32)."""
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return mean, std


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """MAE's loss: mean squared error over masked patches only.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3.

    Args:
        pred: ``[N, L, D]`` predicted patch pixels.
        target: ``[N, L, D]`` true patch pixels.
        mask: ``[N, L]``, 1 = masked (the loss is averaged over these).
        norm_pix: Normalise each target patch by its own mean and std first.

    Returns:
        Scalar float32 loss.

    """
    target = target.float()
    if norm_pix:
        mean, std = patch_norm_stats(target)
        target = (target - mean) / std
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
