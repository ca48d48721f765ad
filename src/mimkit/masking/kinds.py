"""The kinds of mask a backbone can take, as types: one masked forward, ``forward_features(x, mask=...)``.

A backbone lists the kinds it accepts in ``mask_kinds``; a method names the kind it needs in
``mask_kind`` (None: it masks nothing). The composition root pairs them, and a backbone given a
kind it does not take refuses it by name.

- :class:`KeepTokens`: only some patch tokens are encoded, the rest dropped (MAE, He et al.,
  "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
- :class:`TokenMask`: masked patch tokens are replaced by a learned token and the full sequence is
  encoded (BEiT, Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; iBOT,
  Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022).
- :class:`PixelMask`: a dense visible-pixel map through partial convolutions (the hybrid CvT-MAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

#: Every kind of mask; ``mix`` (two images in one input, same-image attention) is for MixMAE.
MASK_KINDS = ("keep_idx", "token_mask", "pixels", "mix")


@dataclass(frozen=True)
class KeepTokens:
    """Keep the patch tokens at ``idx [N, K]`` (indices into the ``L`` patch tokens), drop the rest."""

    idx: torch.Tensor
    kind: ClassVar[str] = "keep_idx"


@dataclass(frozen=True)
class TokenMask:
    """Replace the masked patch tokens by ``token``; ``mask [N, L]`` bool on the backbone's token grid.

    ``token`` (``[D]``) is the learned mask token, a parameter of the method that trains with it, so
    the backbone's own weights stay those of a plain encoder. A backbone without a patch embedding
    to replace (the CvT) hides the masked tokens' pixels instead and ignores ``token``.
    """

    mask: torch.Tensor
    token: torch.Tensor | None = None
    kind: ClassVar[str] = "token_mask"


@dataclass(frozen=True)
class PixelMask:
    """``visible [N, 1, H, W]`` (1 = visible) with the CvT's update-mask placement ``update_mask``."""

    visible: torch.Tensor
    update_mask: str = "pre_norm"
    kind: ClassVar[str] = "pixels"


Mask = KeepTokens | TokenMask | PixelMask


def check_mask(backbone: torch.nn.Module, mask: Mask | None) -> None:
    """Refuse a mask of a kind ``backbone`` does not take, naming the kinds it does.

    Raises:
        TypeError: Not a mask type, or a kind missing from ``backbone.mask_kinds``.

    """
    if mask is None:
        return
    kind = getattr(mask, "kind", None)
    accepted = getattr(backbone, "mask_kinds", frozenset())
    if kind not in accepted:
        raise TypeError(f"{type(backbone).__name__} takes masks of kind {', '.join(sorted(accepted)) or 'none'}, "
                        f"got {type(mask).__name__} ({kind!r})")


def token_mask_to_pixels(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A token mask ``[N, h, w]`` or ``[N, h * w]`` (with ``h, w`` given by the map) as visible pixels.

    Args:
        mask: Bool, True = masked, on an ``h x w`` token grid (square when flattened).
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        ``[N, 1, height, width]`` float32, 1 = visible (nearest-neighbour upsampling of the grid).

    """
    if mask.ndim == 2:
        side = round(mask.shape[1] ** 0.5)
        if side * side != mask.shape[1]:
            raise ValueError(f"a flattened token mask needs a square grid, got {mask.shape[1]} tokens")
        mask = mask.view(-1, side, side)
    visible = (~mask.bool()).float().unsqueeze(1)
    return torch.nn.functional.interpolate(visible, size=(height, width), mode="nearest")


__all__ = ["MASK_KINDS", "KeepTokens", "Mask", "PixelMask", "TokenMask", "check_mask", "token_mask_to_pixels"]
