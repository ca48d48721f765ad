"""Losses shared between methods: the masked autoencoders' reconstruction losses and KoLeo."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def patch_reconstruction(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int,
                         norm_pix: bool, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a patch prediction back to an image, undoing the per-patch normalisation of the target.

    With ``norm_pix`` the prediction is each patch standardised by its own statistics, so it is
    mapped back with the true patch's mean and std (as MAE's demo does).

    Args:
        images: ``[N, C, H, W]`` the true images (normalised input space).
        pred: ``[N, L, p*p*C]`` predicted patches on the ``(H/p) x (W/p)`` grid.
        mask: ``[N, L]``, 1 = hidden.
        patch: Patch side ``p``.
        norm_pix: Whether ``pred`` is per-patch normalised.
        eps: The variance epsilon the loss normalised with.

    Returns:
        ``(reconstruction [N, C, H, W], pixel mask [N, 1, H, W] with 1 = hidden)``.

    """
    c, grid = images.shape[1], (images.shape[-2] // patch, images.shape[-1] // patch)
    pred = pred.float()
    if norm_pix:
        mean, std = patch_norm_stats(patchify(images, patch), eps)
        pred = pred * std + mean
    recon = unpatchify(pred, patch, c, grid)
    return recon, unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch * patch).float(), patch, 1, grid)


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """MAE's loss: mean squared error over masked patches only.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3.

    Args:
        pred: ``[N, L, D]`` predicted patch pixels.
        target: ``[N, L, D]`` true patch pixels.
        mask: ``[N, L]``, 1 = masked (the loss is averaged over these).
        norm_pix: Normalise each target patch by its own mean and std first.
        eps: Added to each patch's variance when normalising (MAE's 1e-6).

    Returns:
        Scalar float32 loss.

    """
    target = target.float()
    if norm_pix:
        mean, std = patch_norm_stats(target, eps)
        target = (target - mean) / std
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _masked_l1(diff: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean of ``|diff|`` over ``region`` (``[N, 1, H, W]``, 0/1) and all channels."""
    count = region.sum() * diff.shape[1]
    return (diff.abs() * region).sum() / count.clamp_min(1.0)


def hole_total_variation(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Total variation of ``image`` between adjacent pixels inside the 1-pixel dilation of the holes.

    Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018: the
    smoothing term over the region P around the holes. A pixel pair counts when both of its pixels
    lie in P; the sum is divided by the number of such pairs (times channels).

    Args:
        image: ``[N, C, H, W]``, the composited output (visible pixels from the input, holes predicted).
        hole: ``[N, 1, H, W]`` float, 1 = hole.

    Returns:
        Scalar float32.

    """
    region = torch.nn.functional.max_pool2d(hole.float(), 3, stride=1, padding=1)  # dilate by 1 px
    image = image.float()
    pair_h = region[..., :, 1:] * region[..., :, :-1]  # horizontal neighbours both in P
    pair_v = region[..., 1:, :] * region[..., :-1, :]  # vertical neighbours both in P
    tv_h = ((image[..., :, 1:] - image[..., :, :-1]).abs() * pair_h).sum()
    tv_v = ((image[..., 1:, :] - image[..., :-1, :]).abs() * pair_v).sum()
    pairs = (pair_h.sum() + pair_v.sum()) * image.shape[1]
    return (tv_h + tv_v) / pairs.clamp_min(1.0)


def inpainting_loss(
    pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor, hole_weight: float = 6.0,
    tv_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hybrid CvT-MAE's inpainting loss: L1 on visible + 6 x L1 on holes + 0.1 x TV near holes.

    Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018, without
    the perceptual and style terms: the inpainting model whose update mask and skip connections
    "MAE-based Hybrid Convolutional ViT for Self-Supervised Learning" brings into masked image
    modelling. Each term is normalised by its own pixel count.

    Args:
        pred: ``[N, C, H, W]`` predicted image.
        target: ``[N, C, H, W]`` true image.
        hole: ``[N, 1, H, W]``, 1 = masked.
        hole_weight: Weight of the hole term.
        tv_weight: Weight of the total-variation term.

    Returns:
        ``(scalar float32 loss, {"l1_valid", "l1_hole", "tv"} detached terms)``.

    """
    pred, target, hole = pred.float(), target.float(), hole.float()
    diff = pred - target
    valid_term = _masked_l1(diff, 1.0 - hole)
    hole_term = _masked_l1(diff, hole)
    composite = hole * pred + (1.0 - hole) * target
    tv_term = hole_total_variation(composite, hole)
    loss = valid_term + hole_weight * hole_term + tv_weight * tv_term
    return loss, {"l1_valid": valid_term.detach(), "l1_hole": hole_term.detach(), "tv": tv_term.detach()}


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo: ``-mean_i log(min_{j != i} |x_i - x_j| + eps)`` of L2-normalised ``x [N, D]``, in float32.

    Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019: the Kozachenko-Leonenko
    estimate of the differential entropy, which spreads the features of a batch; DINOv2 (Oquab et al.,
    "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024) adds it on each global
    crop's student features.

    Args:
        x: ``[N, D]`` features, N >= 2.
        eps: Guards the normalisation, the distance and the log.

    Returns:
        Scalar float32 loss.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # nearest neighbours sqrt(2) apart
        >>> round(float(koleo_loss(x)), 4)
        -0.3466

    """
    with torch.autocast(x.device.type, enabled=False):  # as DINOv2: a bf16 x @ x.T picks wrong neighbours
        x = F.normalize(x.float(), dim=-1, eps=eps)
        with torch.no_grad():  # each point's nearest neighbour, as DINOv2 finds it
            sim = x @ x.T
            sim.fill_diagonal_(-1.0)
            nearest = sim.argmax(dim=1)
        return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()
