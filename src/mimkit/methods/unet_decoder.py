"""U-Net-style decoder over the stage maps of a hierarchical encoder (the hybrid CvT-MAE's).

Ronneberger et al., "U-Net", MICCAI 2015: skip concatenations from the encoder stages; the blocks
are CvT blocks (Wu et al., ICCV 2021), as in the decoder of "MAE-based Hybrid Convolutional ViT for
Self-Supervised Learning".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mimkit.backbones.layers.conv_attention import ConvBlock
from mimkit.backbones.layers.partial_conv import ConvEmbed


def _heads(dim: int, head_dim: int) -> int:
    heads = max(1, dim // head_dim)
    return heads if dim % heads == 0 else 1


class UpStage(nn.Module):
    """Learned x``scale`` upsampling, optional skip concatenation, conv embedding, CvT blocks."""

    def __init__(self, in_dim: int, skip_dim: int, out_dim: int, scale: int, depth: int, head_dim: int,
                 skip: bool, fuse_kernel: int = 3) -> None:
        super().__init__()
        self.skip = skip
        self.up = nn.ConvTranspose2d(in_dim, in_dim, scale, scale)
        # The no-skip variant differs only in the embedding's input width: same depth, same width.
        self.embed = ConvEmbed(in_dim + (skip_dim if skip else 0), out_dim, fuse_kernel, 1, fuse_kernel // 2)
        self.blocks = nn.ModuleList(ConvBlock(out_dim, _heads(out_dim, head_dim)) for _ in range(depth))

    def forward(self, x: torch.Tensor, skip_map: torch.Tensor) -> torch.Tensor:
        """Upsample ``x [N, D_in, h, w]`` to the skip map's ``[N, D_skip, H, W]`` size and fuse."""
        height, width = skip_map.shape[-2:]
        # Stride-2 convs round up (7 -> 4), so the upsampled map is cropped back to the skip's size.
        x = self.up(x)[..., :height, :width]
        if self.skip:
            x = torch.cat([x, skip_map.to(x.dtype)], dim=1)
        x, _ = self.embed(x)
        n, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return tokens.transpose(1, 2).reshape(n, d, h, w)


class UNetDecoder(nn.Module):
    """Decode the stage maps back to pixels, from the deepest map up, fusing each shallower stage.

    Example:
        >>> dec = UNetDecoder(dims=(16, 32, 64), strides=(2, 2, 2), out_chans=1)
        >>> maps = [torch.randn(2, 16, 14, 14), torch.randn(2, 32, 7, 7), torch.randn(2, 64, 4, 4)]
        >>> dec(maps, (28, 28)).shape
        torch.Size([2, 1, 28, 28])

    """

    def __init__(self, dims: Sequence[int], strides: Sequence[int], out_chans: int, depth: int = 2,
                 head_dim: int = 32, skip: bool = True, fuse_kernel: int = 3) -> None:
        """Build the decoder.

        Args:
            dims: Encoder stage widths, shallowest first; decoder stage ``i`` has width ``dims[i]``.
            strides: Encoder stage strides; stage ``i + 1`` is upsampled by ``strides[i + 1]``.
            out_chans: Image channels to predict.
            depth: CvT blocks per decoder stage.
            head_dim: Width per attention head.
            skip: Concatenate the encoder stage maps (U-Net); False gives the equal-size no-skip variant.
            fuse_kernel: Side of the convolution that fuses each upsampled map with its skip (odd; 3 is
                the source's). At full resolution these wide convolutions weigh most in the decoder; a
                1x1 fusion does a ninth of a 3x3's work.

        """
        super().__init__()
        self.ups = nn.ModuleList(
            UpStage(dims[i + 1], dims[i], dims[i], strides[i + 1], depth, head_dim, skip, fuse_kernel)
            for i in reversed(range(len(dims) - 1))
        )
        first = strides[0]
        # Learned sub-pixel upsampling (pixel shuffle), not nearest-neighbour + conv: less blocky.
        self.head = nn.Sequential(nn.Conv2d(dims[0], out_chans * first * first, 1), nn.PixelShuffle(first))

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Stage maps (shallowest first, ``[N, D_i, H_i, W_i]``) to an image ``[N, C, H, W]``."""
        x = maps[-1]
        for up, skip_map in zip(self.ups, reversed(maps[:-1]), strict=True):
            x = up(x, skip_map)
        return self.head(x)[..., : size[0], : size[1]]
