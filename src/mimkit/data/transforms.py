"""Augmentation and normalisation applied to whole batches of uint8 tensors.

On a CPU a per-sample PIL pipeline costs as much as a small model, so for in-memory datasets the
random resized crop and flip are one batched ``grid_sample`` call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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
    sample = images[::step]
    return moments(sample[i : i + 256] for i in range(0, sample.shape[0], 256))


def moments(chunks: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std in [0, 1] of uint8 batches ``[B, C, H, W]`` taken together.

    Summed batch by batch in float64, so ten thousand 224 px images take one batch's memory, not
    the float copy of them all.
    """
    n, total, squares = 0, None, None
    for x in chunks:
        x = x.double().div_(255)
        s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        n += x.numel() // x.shape[1]
    if total is None:
        raise ValueError("moments of no images")
    mean = total / n
    var = (squares - n * mean.square()) / max(1, n - 1)
    return mean.tolist(), var.clamp_min(0).sqrt().tolist()


class Normalize:
    """uint8 ``[B, C, H, W]`` to float32 standardised with per-channel ``mean``/``std`` (in [0, 1] units)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        """Store the statistics as broadcastable tensors."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Standardise a batch."""
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)

    def stats(self) -> tuple[list[float], list[float]]:
        """The per-channel ``(mean, std)`` in [0, 1] units, as given."""
        return (self.mean / 255).flatten().tolist(), (self.std / 255).flatten().tolist()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse map to [0, 1] pixel values, clamped."""
        return ((x.float() * self.std.to(x.device) + self.mean.to(x.device)) / 255).clamp(0, 1)


def random_resized_crop_batch(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    hflip: bool | float,
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
        hflip: Probability of flipping each sample (``True``: 0.5, ``False``: 0).
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
    p_flip = 0.5 if hflip is True else float(hflip)
    sign = torch.where(torch.rand(b, **opts) < p_flip, -1.0, 1.0) if p_flip > 0 else torch.ones(b)
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


def rand_augment_batch(
    images: torch.Tensor, num_ops: int, magnitude: int, num_bins: int = 31,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandAugment with its own draw per image, applied to a whole uint8 batch.

    Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search space"
    (NeurIPS 2020), as torchvision's ``v2.RandAugment`` defines it: its operation table, strengths
    and operations are used as they are. Every image gets ``num_ops`` operations drawn uniformly
    from the table, each at ``magnitude`` with a random sign where the operation has one, as
    ``v2.RandAugment`` draws for one image; the batch is split by (operation, sign) so that each
    operation runs once on its sub-batch (a per-image loop costs more than a small model's training
    step on a CPU).

    Args:
        images: ``[B, C, H, W]`` uint8 batch (C = 1 or 3).
        num_ops: Operations per image (RandAugment's N).
        magnitude: Strength index in ``[0, num_bins)`` (RandAugment's M).
        num_bins: Number of strength levels (torchvision's default 31).
        generator: RNG for the draws (a seeded one makes a resumed run draw the same).

    Returns:
        ``[B, C, H, W]`` uint8 batch.

    """
    if images.dtype != torch.uint8:
        raise TypeError(f"rand_augment_batch takes a uint8 batch, got {images.dtype}")
    ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_bins)
    space = ra._AUGMENTATION_SPACE  # name -> (strengths(num_bins, height, width), signed)
    names = list(space)
    out = images.clone()
    b, (h, w) = images.shape[0], images.shape[-2:]
    ops = torch.randint(len(names), (num_ops, b), generator=generator)
    negative = torch.rand(num_ops, b, generator=generator) < 0.5
    for j in range(num_ops):
        for o, name in enumerate(names):
            strengths, signed = space[name]
            levels = strengths(num_bins, h, w)
            m = float(levels[magnitude]) if levels is not None else 0.0
            for neg in (False, True) if signed else (False,):
                sel = ((ops[j] == o) & (negative[j] == neg if signed else True)).nonzero().flatten()
                if sel.numel():
                    out[sel] = ra._apply_image_or_video_transform(out[sel], name, -m if neg else m,
                                                                  interpolation=ra.interpolation, fill=ra._fill)
    return out


def random_erasing_batch(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020) per image.

    torchvision's ``v2.RandomErasing`` (area 2-33 %, aspect 0.3-3.3) on each image of a normalised
    batch with probability ``p``, the erased box filled with standard-normal noise as timm's
    ``mode="pixel"`` fills it. With a ``generator``, the global RNG is seeded from it inside a fork:
    the draws are reproducible and the global RNG does not move (without one, it advances).

    Args:
        x: ``[B, C, H, W]`` float batch, normalised.
        p: Probability that an image gets a box.
        generator: RNG the draws are seeded from.

    Returns:
        ``[B, C, H, W]`` float batch.

    """
    if p <= 0:
        return x
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    erase = v2.RandomErasing(p=p, value="random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([erase(img) for img in x])


def pil_eval_transform(size: int) -> v2.Compose:
    """Per-sample evaluation transform: resize the shorter side, centre crop, uint8 tensor."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
