"""Tokens computed only where a map holds visible input: the sparse mode of the CvT encoder.

A masked autoencoder saves most of its compute by encoding the visible tokens alone (He et al.,
"Masked Autoencoders Are Scalable Vision Learners", CVPR 2022). A convolution cannot drop positions,
so in the sparse mode the convolutions see hidden positions as empty (zero), as the masked
convolutions of ConvMAE (Gao et al., "ConvMAE: Masked Convolution Meets Masked Autoencoders",
NeurIPS 2022) and SparK (Tian et al., "Designing BERT for Convolutional Networks: Sparse and
Hierarchical Masked Modeling", ICLR 2023) do, while attention, MLP and norms run on the visible
tokens gathered out of the map. Images of a batch may keep different numbers of tokens; each is
padded to the longest, and padding never enters a result: it reads zeros, is kept out of
BatchNorm statistics and attention, and is dropped when the tokens go back into a map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Packed:
    """The visible positions of ``height x width`` maps, packed per image (raster order).

    Attributes:
        index: ``[N, L]`` int64 flat positions ``y * width + x`` of each image's visible tokens,
            ``L`` the largest count of the batch; the padding of image ``n`` after its own count
            points at slots past the map (``height * width + j``), so no two entries share a slot.
        valid: ``[N, L]`` bool, False on the padding.
        height: Map height.
        width: Map width.
        count: Visible tokens of the whole batch (``valid.sum()``, known without a device sync).

    """

    index: torch.Tensor
    valid: torch.Tensor
    height: int
    width: int
    count: int

    @classmethod
    def of(cls, visible: torch.Tensor) -> Packed:
        """The packing of a mask ``[N, 1, H, W]`` (nonzero = visible, any dtype)."""
        n, _, h, w = visible.shape
        flat = visible.reshape(n, h * w) != 0
        counts = flat.sum(dim=1)
        # One transfer for both numbers (a device sync on CUDA); the blocks then need none.
        longest, count = torch.stack([counts.max(), counts.sum()]).tolist()
        length = max(1, longest)
        # A stable sort puts the visible positions first, each image's in raster order.
        order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)[:, :length]
        slots = torch.arange(length, device=visible.device)
        valid = slots < counts[:, None]
        return cls(torch.where(valid, order, h * w + slots), valid, h, w, count)

    @property
    def length(self) -> int:
        """Tokens per image after packing (the batch's largest visible count)."""
        return self.index.shape[1]

    @property
    def padded(self) -> bool:
        """Whether some image keeps fewer tokens than the longest (so the packing holds padding)."""
        return self.count < self.valid.numel()

    def gather(self, fmap: torch.Tensor) -> torch.Tensor:
        """The visible tokens ``[N, L, D]`` of a map ``[N, D, H, W]`` (zeros on the padding)."""
        n, d = fmap.shape[:2]
        flat = fmap.flatten(2).transpose(1, 2)  # [N, HW, D]
        # Only padding points past the map: without it the map needs no zero tail to read.
        flat = F.pad(flat, (0, 0, 0, self.length)) if self.padded else flat
        # Gathered along the token axis, the tokens come out contiguous, as the blocks read them.
        return flat.gather(1, self.index.unsqueeze(-1).expand(n, -1, d))

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[N, L, D]`` back into a map ``[N, D, H, W]``, zero where nothing is visible."""
        n, _, d = tokens.shape
        area = self.height * self.width
        flat = tokens.new_zeros(n, area + (self.length if self.padded else 0), d)
        flat = flat.scatter(1, self.index.unsqueeze(-1).expand(n, -1, d), tokens)
        # The map as a view of the tokens, channels last, as the dense stage hands it on: the
        # decoder's convolutions were measured twice as fast on it as on a channels-first copy.
        return flat[:, :area].transpose(1, 2).reshape(n, d, self.height, self.width)

    def mask(self) -> torch.Tensor:
        """The visible positions as a float32 map ``[N, 1, H, W]`` (1 = visible)."""
        ones = self.valid.to(torch.float32).unsqueeze(-1)  # [N, L, 1]
        return self.scatter(ones)


def batch_norm_where(bn: nn.BatchNorm2d, tokens: torch.Tensor, keep: torch.Tensor,
                     kept: int | None = None) -> torch.Tensor:
    """``bn`` applied to tokens ``[N, L, D]`` with its statistics over the ``keep [N, L]`` ones only.

    In training mode the batch statistics (and the running averages) come from the kept tokens
    alone, so positions that hold nothing (hidden or padding, all zero) do not pull them towards
    zero; the other tokens come out as zeros. In evaluation mode every kept token is normalised by
    the running statistics, as ``bn`` would. A single kept token has no batch variance: it is
    normalised by the running statistics, which it leaves as they are.

    ``kept`` (optional) is ``keep.sum()`` when the caller knows it: with every token kept, the tokens
    are normalised in place of a gathered copy, with the same numbers; otherwise the kept rows are
    found without asking the device how many there are (no CUDA sync).
    """
    d = tokens.shape[-1]
    flat = tokens.reshape(-1, d)
    every = kept is not None and kept == keep.numel()
    where = None if every or kept is None else keep.flatten().nonzero_static(size=kept).squeeze(1)
    rows = flat if every else tokens[keep] if where is None else flat.index_select(0, where)  # [M, D]
    batch_stats = (bn.training or not bn.track_running_stats) and rows.shape[0] > 1
    if batch_stats and bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / max(1, int(bn.num_batches_tracked or 1))
    normed = F.batch_norm(rows, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                          batch_stats or bn.running_mean is None, factor, bn.eps)
    normed = normed.to(tokens.dtype)
    if every:
        return normed.reshape(tokens.shape)
    if where is not None:
        return flat.new_zeros(flat.shape).index_copy(0, where, normed).reshape(tokens.shape)
    return tokens.new_zeros(tokens.shape).index_put((keep,), normed)


@dataclass(frozen=True)
class SparseStage:
    """What every block of a sparse stage shares: its visible tokens and its key/value windows.

    Attributes:
        tokens: The stage's visible tokens (queries, MLP, norms).
        keys: The key/value windows of the strided projection that hold at least one visible token;
            the others would only see empty positions, and are left out of attention.

    """

    tokens: Packed
    keys: Packed
