"""Augmentation and normalisation applied to whole batches of uint8 tensors.

On a CPU a per-sample PIL pipeline costs as much as a small model, so for in-memory datasets the
random resized crop and flip are one batched ``grid_sample`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


#: RandAugment's operations (Cubuk et al., "RandAugment: Practical automated data augmentation with
#: a reduced search space", NeurIPS 2020) as torchvision's ``v2.RandAugment`` defines them: each maps
#: a uint8 batch and the strength ``m`` in [0, 1] (``magnitude / (bins - 1)``) with its sign to a batch.
_RAND_AUGMENT_OPS: tuple[tuple[str, Callable[[torch.Tensor, float], torch.Tensor]], ...] = (
    ("identity", lambda x, m: x),
    ("shear_x", lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                       shear=[math.degrees(math.atan(0.3 * m)), 0.0])),
    ("shear_y", lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                       shear=[0.0, math.degrees(math.atan(0.3 * m))])),
    ("translate_x", lambda x, m: TF.affine(x, angle=0.0, translate=[int(150 / 331 * x.shape[-1] * m), 0],
                                           scale=1.0, shear=[0.0, 0.0])),
    ("translate_y", lambda x, m: TF.affine(x, angle=0.0, translate=[0, int(150 / 331 * x.shape[-2] * m)],
                                           scale=1.0, shear=[0.0, 0.0])),
    ("rotate", lambda x, m: TF.rotate(x, 30.0 * m)),
    ("brightness", lambda x, m: TF.adjust_brightness(x, 1.0 + 0.9 * m)),
    ("color", lambda x, m: TF.adjust_saturation(x, 1.0 + 0.9 * m)),
    ("contrast", lambda x, m: TF.adjust_contrast(x, 1.0 + 0.9 * m)),
    ("sharpness", lambda x, m: TF.adjust_sharpness(x, 1.0 + 0.9 * m)),
    ("posterize", lambda x, m: TF.posterize(x, 8 - round(4 * abs(m)))),
    ("solarize", lambda x, m: TF.solarize(x, 255.0 * (1.0 - abs(m)))),
    ("autocontrast", lambda x, m: TF.autocontrast(x)),
    ("equalize", lambda x, m: TF.equalize(x)),
)
#: Operations whose strength takes a random sign (the others use its magnitude only).
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
           "sharpness"}


def rand_augment_batch(
    images: torch.Tensor, num_ops: int, magnitude: int, num_bins: int = 31,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandAugment with its own draw per image, applied to a whole uint8 batch.

    Every image gets ``num_ops`` operations drawn uniformly from torchvision's RandAugment list, each
    at ``magnitude`` with a random sign where the operation has one, exactly as ``v2.RandAugment``
    draws for one image. The batch is split by (operation, sign) so that each operation runs once on
    its sub-batch: a per-image loop costs more than a small model's training step on a CPU.

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
    out = images.clone()
    b, strength = images.shape[0], magnitude / (num_bins - 1)
    ops = torch.randint(len(_RAND_AUGMENT_OPS), (num_ops, b), generator=generator)
    negative = torch.rand(num_ops, b, generator=generator) < 0.5
    for j in range(num_ops):
        for o, (name, op) in enumerate(_RAND_AUGMENT_OPS):
            for neg in (False, True) if name in _SIGNED else (False,):
                chosen = ops[j] == o
                if name in _SIGNED:
                    chosen &= negative[j] == neg
                sel = chosen.nonzero().flatten()
                if sel.numel():
                    out[sel] = op(out[sel], -strength if neg else strength)
    return out


def random_erasing_batch(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020) per image.

    torchvision's ``v2.RandomErasing`` (area 2-33 %, aspect 0.3-3.3) on each image of a normalised
    batch with probability ``p``, the erased box filled with standard-normal noise as timm's
    ``mode="pixel"`` fills it. The global RNG is seeded from ``generator`` inside a fork, so the
    draws are reproducible and nothing else's RNG moves.

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


def pil_train_transform(size: int, scale: tuple[float, float], hflip: bool,
                        randaugment: tuple[int, int] = (0, 9)) -> v2.Compose:
    """Per-sample transform for streamed datasets: PIL image to a uint8 ``[C, size, size]`` tensor.

    ``randaugment`` is RandAugment's (N, M); N = 0 leaves it out.
    """
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment[0] > 0:
        steps.append(v2.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
    return v2.Compose(steps)


def pil_eval_transform(size: int) -> v2.Compose:
    """Per-sample evaluation transform: resize the shorter side, centre crop, uint8 tensor."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
