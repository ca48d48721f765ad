"""Augmented views of a training image, declared by a method and built by the data pipeline.

A method states the views it trains on as a list of :class:`ViewSpec` (one for MAE; two global and
several local crops for DINO, Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021). The loader builds them on both data paths:

- in memory (:func:`views_batch`): whole uint8 batches augmented at once, every random draw from one
  generator seeded per batch, so a run resumed mid-epoch draws the same crops;
- from files (:func:`pil_views_transform`): torchvision's v2 transforms per image in the
  DataLoader workers.

Both apply, per view: random resized crop and flip, colour jitter (brightness, contrast,
saturation, hue) with probability ``jitter``, grey with probability ``grayscale``, Gaussian blur
with probability ``blur``, solarisation with probability ``solarize``, in that order (DINO's).
Each image draws its own parameters. One difference from torchvision's ``ColorJitter``: the batched
path applies the four jitter operations in that fixed order, where torchvision shuffles their order
per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mimkit.data.transforms import random_resized_crop_batch
from mimkit.errors import ConfigError

#: torchvision's solarisation threshold for uint8 images (pixels at or above it are inverted).
SOLARIZE_THRESHOLD = 128 / 255
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class ViewSpec:
    """How one view of a training image is drawn.

    Attributes:
        size: Output side in pixels; 0 means ``data.img_size``.
        scale: Random resized crop's area range, as a fraction of the image; ``[1, 1]`` keeps it whole.
        ratio: The crop's aspect-ratio range (log-uniform).
        hflip: Probability of a horizontal flip.
        jitter: Probability of colour jitter.
        brightness: Jitter's brightness strength: factor uniform in ``[1 - b, 1 + b]``.
        contrast: Jitter's contrast strength, as ``brightness``.
        saturation: Jitter's saturation strength, as ``brightness`` (no effect on grey images).
        hue: Jitter's hue shift, uniform in ``[-h, h]``, ``h <= 0.5`` (no effect on grey images).
        grayscale: Probability of converting to grey (no effect on grey images).
        blur: Probability of a Gaussian blur.
        blur_sigma: The blur's standard-deviation range in pixels (uniform).
        solarize: Probability of inverting the pixels at or above 128 (of 255).
        count: How many views of this kind (DINO's local crops: one spec, ``count`` views).

    """

    size: int = 0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    count: int = 1

    def resolved_size(self, img_size: int) -> int:
        """The output side: ``size``, or ``img_size`` when ``size`` is 0."""
        return self.size or img_size

    def blur_kernel(self, side: int) -> int:
        """The blur's odd kernel side on a ``side``-pixel view: three standard deviations each side of
        the largest sigma, at most ``2 * side - 1`` (reflect padding needs less than the image).
        """
        return min(2 * math.ceil(3 * self.blur_sigma[1]) + 1, 2 * side - 1)


def parse_views(raw: Sequence[dict[str, Any]] | None, where: str = "method.views") -> list[ViewSpec]:
    """View specs from a config's list of dicts (one dict per kind of view), checked.

    Args:
        raw: E.g. ``[{"scale": [0.4, 1], "count": 2}, {"size": 16, "scale": [0.1, 0.4], "count": 6}]``.
        where: The config key, for error messages.

    Returns:
        One :class:`ViewSpec` per kind, in order (``count`` not expanded).

    Raises:
        ConfigError: Not a list of dicts, an unknown key (the valid ones listed), or a value out of range.

    """
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)) or not all(isinstance(v, dict) for v in raw):
        raise ConfigError(f"{where} must be a list of view settings (dicts), got {raw!r}")
    valid = [f.name for f in fields(ViewSpec)]
    specs = []
    for i, view in enumerate(raw):
        key = f"{where}[{i}]"
        unknown = sorted(set(view) - set(valid))
        if unknown:
            raise ConfigError(f"{key}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        try:
            spec = ViewSpec(**{k: _value(k, v, key) for k, v in view.items()})
            _check(spec, key)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        specs.append(spec)
    return specs


_RANGES = ("scale", "ratio", "blur_sigma")
_INTS = ("size", "count")


def _value(name: str, v: Any, key: str) -> Any:
    """A view setting as :class:`ViewSpec` holds it: ranges as float pairs, sizes as ints, the rest as
    floats; ``hflip: true`` means DINO's and MAE's flip half the time, a boolean elsewhere is refused.
    """
    if name in _RANGES:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ConfigError(f"{key}.{name} must be [lo, hi], got {v!r}")
        return tuple(float(x) for x in v)
    if name in _INTS:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}.{name} must be an integer, got {v!r}")
        return v
    if isinstance(v, bool):
        if name == "hflip":
            return 0.5 if v else 0.0
        raise ConfigError(f"{key}.{name} must be a number, got {v!r}")
    if not isinstance(v, (int, float)):
        raise ConfigError(f"{key}.{name} must be a number, got {v!r}")
    return float(v)


def _check(s: ViewSpec, key: str) -> None:
    def need(ok: bool, name: str, valid: str) -> None:
        if not ok:
            raise ConfigError(f"{key}.{name} must be {valid}, got {getattr(s, name)!r}")

    for name in _RANGES:
        need(0 < getattr(s, name)[0] <= getattr(s, name)[1], name, "[lo, hi] with 0 < lo <= hi")
    need(s.scale[1] <= 1.0, "scale", "[lo, hi] with hi <= 1")
    for name in ("hflip", "jitter", "grayscale", "blur", "solarize"):
        need(0.0 <= float(getattr(s, name)) <= 1.0, name, "a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        need(0.0 <= float(getattr(s, name)) < 1.0, name, "in [0, 1)")
    need(0.0 <= float(s.hue) <= 0.5, "hue", "in [0, 0.5]")
    need(s.size >= 0, "size", "an integer >= 0 (0: data.img_size)")
    need(s.count >= 1, "count", "an integer >= 1")


def expand_views(specs: Sequence[ViewSpec]) -> list[ViewSpec]:
    """One spec per view: each spec repeated ``count`` times."""
    return [s for s in specs for _ in range(s.count)]


def views_to_config(specs: Sequence[ViewSpec]) -> list[dict[str, Any]]:
    """The config form of view specs (lists for ranges), the inverse of :func:`parse_views`."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()} for s in specs]


# ---- the batched tensor path: images [B, C, H, W] float in [0, 1], one draw per image ----


def _per_image(b: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``[B]`` bool: which images an operation of probability ``p`` applies to."""
    return torch.rand(b, generator=generator) < p


def _uniform(b: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(b).uniform_(lo, hi, generator=generator)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` luma of an RGB or grey batch."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other``, clamped to [0, 1], with ``factor [B]`` per image."""
    f = factor.to(x).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return torch.stack([(h / 6.0) % 1.0, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sextants = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))  # [6, B, 3, H, W]
    table = torch.stack([torch.stack(c, 1) for c in sextants], 0)
    return table.gather(0, i.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)).squeeze(0)


def adjust_hue_batch(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB image's hue by ``shift [B]`` (fractions of a turn, in [-0.5, 0.5]).

    The same map as torchvision's ``adjust_hue`` on each image; a grey batch is returned as it is.
    """
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.to(x).view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def color_jitter_batch(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, each image with probability ``spec.jitter``.

    Args:
        x: ``[B, C, H, W]`` float in [0, 1].
        spec: Strengths and probability.
        generator: RNG for the draws.

    Returns:
        ``[B, C, H, W]`` float in [0, 1].

    """
    b = x.shape[0]
    on = _per_image(b, spec.jitter, generator)
    draws = {name: _uniform(b, 1 - getattr(spec, name), 1 + getattr(spec, name), generator)
             for name in ("brightness", "contrast", "saturation")}
    shift = _uniform(b, -spec.hue, spec.hue, generator)
    if not on.any():
        return x
    ones = torch.ones(b)
    y = _blend(x, torch.zeros_like(x), torch.where(on, draws["brightness"], ones))
    mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = _blend(y, mean, torch.where(on, draws["contrast"], ones))
    if x.shape[1] == 3:
        y = _blend(y, _grey(y), torch.where(on, draws["saturation"], ones))
        if spec.hue > 0:
            y = torch.where(on.view(-1, 1, 1, 1), adjust_hue_batch(y, shift), y)
    return y


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with its own ``sigma [B]`` per image, reflect padding (torchvision's).

    Args:
        x: ``[B, C, H, W]`` float.
        sigma: Standard deviations in pixels, one per image.
        kernel: Odd kernel side (at most ``2 * min(H, W) - 1``, as reflect padding needs).

    Returns:
        ``[B, C, H, W]`` float.

    """
    b, c, h, w = x.shape
    k = min(kernel, 2 * min(h, w) - 1)
    half = (k - 1) / 2
    t = torch.linspace(-half, half, k, dtype=torch.float32, device=x.device)
    g = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.device, torch.float32).view(-1, 1)) ** 2)
    g = (g / g.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # [B*C, k]
    pad = k // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, g.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, g.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def augment_view_batch(images: torch.Tensor, spec: ViewSpec, img_size: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One view of every image of a batch, as :class:`ViewSpec` describes it.

    Args:
        images: ``[B, C, H, W]`` float with uint8 values (0-255).
        spec: The view.
        img_size: ``data.img_size`` (the output side when ``spec.size`` is 0).
        generator: RNG for every draw (seeded per batch by the loader).

    Returns:
        ``[B, C, S, S]`` float with values in [0, 255].

    """
    size = spec.resolved_size(img_size)
    x = random_resized_crop_batch(images, size, spec.scale, spec.hflip, spec.ratio, generator=generator)
    if not (spec.jitter or spec.grayscale or spec.blur or spec.solarize):
        return x
    x = (x / 255).clamp_(0, 1)
    b = x.shape[0]
    if spec.jitter:
        x = color_jitter_batch(x, spec, generator)
    if spec.grayscale:
        grey = _per_image(b, spec.grayscale, generator).view(-1, 1, 1, 1)
        x = torch.where(grey, _grey(x).expand_as(x), x)
    if spec.blur:
        blur = _per_image(b, spec.blur, generator).view(-1, 1, 1, 1)
        sigma = _uniform(b, *spec.blur_sigma, generator)
        x = torch.where(blur, gaussian_blur_batch(x, sigma, spec.blur_kernel(size)), x)
    if spec.solarize:
        sol = _per_image(b, spec.solarize, generator).view(-1, 1, 1, 1)
        x = torch.where(sol & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
    return x * 255


def views_batch(images: torch.Tensor, specs: Sequence[ViewSpec], img_size: int,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Every view of a batch: one ``[B, C, S_v, S_v]`` float (0-255) tensor per view, in spec order.

    Args:
        images: ``[B, C, H, W]`` float with uint8 values.
        specs: The method's views (``count`` expanded here).
        img_size: ``data.img_size``.
        generator: RNG for every draw.

    """
    return [augment_view_batch(images, s, img_size, generator) for s in expand_views(specs)]


# ---- the per-image path for streamed datasets: torchvision v2 transforms ----


def pil_view_transform(spec: ViewSpec, img_size: int, channels: int,
                       randaugment: tuple[int, int] = (0, 9)) -> v2.Compose:
    """The v2 transforms drawing one view of a PIL image, to a uint8 ``[C, S, S]`` tensor.

    ``randaugment`` is RandAugment's (N, M), applied last; N = 0 leaves it out.
    """
    steps: list[Callable] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(spec.resolved_size(img_size), scale=spec.scale, ratio=spec.ratio, antialias=True),
    ]
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip(float(spec.hflip)))
    colour: list[Callable] = []
    if spec.jitter:
        colour.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                     p=spec.jitter))
    if spec.grayscale and channels == 3:
        colour.append(v2.RandomGrayscale(spec.grayscale))
    if spec.blur:
        kernel = spec.blur_kernel(spec.resolved_size(img_size))
        colour.append(v2.RandomApply([v2.GaussianBlur(kernel, spec.blur_sigma)], p=spec.blur))
    if spec.solarize:
        colour.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=spec.solarize))
    if colour:
        steps += [v2.ToDtype(torch.float32, scale=True), *colour, v2.ToDtype(torch.uint8, scale=True)]
    if randaugment[0] > 0:
        steps.append(v2.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
    return v2.Compose(steps)


class MultiView:
    """A PIL image to its views: a uint8 tensor for a single view, else a list of them in spec order."""

    def __init__(self, specs: Sequence[ViewSpec], img_size: int, channels: int,
                 randaugment: tuple[int, int] = (0, 9)) -> None:
        """One v2 pipeline per view (see :func:`pil_view_transform`)."""
        self.specs = expand_views(specs)
        self.transforms = [pil_view_transform(s, img_size, channels, randaugment) for s in self.specs]

    def __call__(self, img: Any) -> torch.Tensor | list[torch.Tensor]:
        """Draw every view of ``img``."""
        views = [t(img) for t in self.transforms]
        return views[0] if len(views) == 1 else views


__all__ = ["SOLARIZE_THRESHOLD", "MultiView", "ViewSpec", "adjust_hue_batch", "augment_view_batch",
           "color_jitter_batch", "expand_views", "gaussian_blur_batch", "parse_views", "pil_view_transform",
           "views_batch", "views_to_config"]
