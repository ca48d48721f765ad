"""The kinds of mask a backbone can take, as types: one masked forward, ``forward_features(x, mask=...)``.

A backbone lists the kinds it accepts in ``mask_kinds``; a method names the kind it needs in
``mask_kind`` (None: it masks nothing; a tuple: the kinds it can hand, in order of preference).
The composition root pairs them, and a backbone given a kind it does not take refuses it by name.

- :class:`KeepTokens`: only some patch tokens are encoded, the rest dropped (MAE, He et al.,
  "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
- :class:`TokenMask`: masked patch tokens are replaced by a learned token and the full sequence is
  encoded (BEiT, Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; iBOT,
  Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022).
- :class:`PixelMask`: a dense visible-pixel map through partial convolutions (the hybrid CvT-MAE).
- :class:`MixPairs`: the input is two images mixed, and every token may only see tokens of its own
  image (MixMAE, Liu et al., "MixMAE: Mixed and Masked Autoencoder for Efficient Pretraining of
  Hierarchical Vision Transformers", CVPR 2023).
- :class:`MixGroups`: groups of images mixed into one token sequence, with homologous attention
  (MixedAE, Chen et al., "Mixed Autoencoder for Self-supervised Visual Representation Learning",
  CVPR 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

#: Every kind of mask: ``mix`` (two images in one input, same-image attention) is MixMAE's, ``groups``
#: (images mixed into one token sequence) MixedAE's.
MASK_KINDS = ("keep_idx", "token_mask", "pixels", "mix", "groups")


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


@dataclass(frozen=True)
class MixPairs:
    """The input is a pair mix (:func:`~mimkit.masking.mixing.mix_pairs`) with ``labels`` on the final grid.

    ``labels`` is ``[h, w]`` (shared by the batch, MixMAE's) or ``[N, h, w]``, 0 where a sample
    shows its own image and 1 where it shows its partner's, on the grid of the encoder's output
    tokens; the backbone upsamples it to every stage and keeps the two images apart there (attention
    restricted to same-label tokens, convolutions that read only same-label inputs). ``embeds``
    (optional, one ``[2, D_s]`` per stage, a parameter of the method) is MixMAE's mix embedding:
    ``embeds[s][label]`` is added to every token at the input of stage ``s``'s blocks. ``update_mask``
    is the CvT's re-weighting of each image's partial convolutions (the other image's pixels are
    its holes); the Swin ignores it.
    """

    labels: torch.Tensor
    embeds: tuple[torch.Tensor, ...] | None = None
    update_mask: str = "pre_norm"
    kind: ClassVar[str] = "mix"

    def stage_labels(self, size: tuple[int, int]) -> torch.Tensor:
        """The labels as ``[N or 1, H, W]`` int64 on a stage's ``H x W`` map (nearest upsampling)."""
        from mimkit.masking.mixing import upsample_labels

        labels = self.labels if self.labels.ndim == 3 else self.labels.unsqueeze(0)
        return upsample_labels(labels.long(), size)


@dataclass(frozen=True)
class MixGroups:
    """Mix groups of ``G`` images into one token sequence each; ``source [N / G, L]`` says which image of
    its group (0 .. G-1) each position is taken from (:func:`~mimkit.masking.mixing.group_assignment`).

    ``seg_embed`` (optional ``[G, D]``, a parameter of the method) is added to each token by its
    image index. Blocks from ``topk_from`` on use homologous attention with ``K = L / G + 1``; a
    ``stats`` dict, when given, receives each such block's homologous recognition accuracy.
    """

    source: torch.Tensor
    seg_embed: torch.Tensor | None = None
    topk_from: int = 0
    stats: dict[int, torch.Tensor] | None = None
    kind: ClassVar[str] = "groups"


Mask = KeepTokens | TokenMask | PixelMask | MixPairs | MixGroups


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


def as_kinds(mask_kind: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A method's ``mask_kind`` as a tuple of kinds in order of preference (None: it masks nothing)."""
    return (mask_kind,) if isinstance(mask_kind, str) else mask_kind


__all__ = ["MASK_KINDS", "KeepTokens", "Mask", "MixGroups", "MixPairs", "PixelMask", "TokenMask", "as_kinds",
           "check_mask", "token_mask_to_pixels"]
