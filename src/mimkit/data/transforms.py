"""Augmentation and normalisation applied to whole batches of uint8 tensors.

On a CPU a per-sample PIL pipeline costs as much as a small model, so for in-memory datasets the
random resized crop and flip are one batched ``grid_sample`` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(images: torch.Tensor, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of a uint8 image tensor ``[N, C, H, W]``.

    Uses an evenly spaced subset of at most ``max_images`` images, so it is deterministic.
    """
    step = max(1, images.shape[0] // max_images)
    x = images[::step].float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


class Normalize:
    """uint8 ``[B, C, H, W]`` to float32 standardised with per-channel ``mean``/``std`` (in [0, 1] units)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        """Store the statistics as broadcastable tensors."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Standardise a batch."""
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse map to [0, 1] pixel values, clamped."""
        return ((x.float() * self.std.to(x.device) + self.mean.to(x.device)) / 255).clamp(0, 1)


def random_resized_crop_batch(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    hflip: bool,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a whole batch in one ``grid_sample``.

    Each sample gets its own crop of area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), clipped to the image, resized bilinearly to ``size x size``.

    Args:
        images: ``[B, C, H, W]`` float tensor.
        size: Output side.
        scale: Range of the crop's area as a fraction of the image.
        hflip: Flip each sample with probability 0.5.
        ratio: Range of the crop's aspect ratio.
        generator: Optional RNG.

    Returns:
        ``[B, C, size, size]`` float tensor.

    """
    b = images.shape[0]
    opts = dict(generator=generator, dtype=torch.float32)
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, **opts) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, **opts) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, **opts) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(images.device), [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a float batch to ``size x size`` (bilinear, antialiased) if it is not already."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pil_train_transform(size: int, scale: tuple[float, float], hflip: bool) -> v2.Compose:
    """Per-sample transform for streamed datasets: PIL image to a uint8 ``[C, size, size]`` tensor."""
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def pil_eval_transform(size: int) -> v2.Compose:
    """Per-sample evaluation transform: resize the shorter side, centre crop, uint8 tensor."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
