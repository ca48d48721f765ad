"""Light decoders shared by the methods: a transformer over mask tokens (the token-based masked
autoencoders) and a convolution stack over the token grid (data2vec 2.0, the visual tokenizers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.backbones.layers.cpu_kernels import attention_kernel
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.pos_embed import sincos_2d


class MaskTokenDecoder(nn.Module):
    """MAE's decoder: project, fill masked positions with a mask token, transformer, predict.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3.
    """

    def __init__(
        self, encoder_dim: int, dim: int, depth: int, num_heads: int, out_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        """Build the decoder.

        Args:
            encoder_dim: Width of the encoder tokens.
            dim: Decoder width.
            depth: Decoder blocks.
            num_heads: Decoder attention heads.
            out_dim: Values predicted per token (``p*p*C`` for pixels).
            mlp_ratio: MLP hidden width / ``dim``.

        """
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=layer_norm) for _ in range(depth)
        ])
        self.norm = layer_norm(dim)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self, latent: torch.Tensor, restore_idx: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1
    ) -> torch.Tensor:
        """Decode visible tokens to a prediction for every position.

        Args:
            latent: Encoder output ``[N, prefix_tokens + K, D_enc]`` (class token first).
            restore_idx: ``[N, L]`` indices that undo the masking shuffle.
            grid: Patch grid ``(gh, gw)`` with ``gh * gw = L``.
            prefix_tokens: 1 when ``latent`` starts with a class token (decoded with the patches,
                as MAE does), 0 when it holds patch tokens only.

        Returns:
            ``[N, L, out_dim]`` predictions in the original token order (class token dropped).

        """
        x = self.embed(latent)  # [N, prefix+K, d]
        n, k = x.shape[0], x.shape[1] - prefix_tokens
        length = restore_idx.shape[1]
        masked = self.mask_token.to(x.dtype).expand(n, length - k, -1)
        tokens = torch.cat([x[:, prefix_tokens:], masked], dim=1)  # [N, L, d], shuffled order
        index = restore_idx.unsqueeze(-1).expand(-1, -1, self.dim)
        tokens = torch.gather(tokens, 1, index)  # [N, L, d], original order
        tokens = tokens + sincos_2d(*grid, self.dim, x.device).to(x.dtype)
        tokens = torch.cat([x[:, :prefix_tokens], tokens], dim=1)
        with attention_kernel(tokens, tokens.shape[1], tokens.shape[1]):
            tokens = self.norm(self.blocks(tokens))
        return self.pred(tokens[:, prefix_tokens:])  # [N, L, out_dim]


class ConvDecoder(nn.Module):
    """data2vec 2.0's decoder (Baevski et al., "Efficient Self-supervised Learning with Contextualized
    Target Representations for Vision, Speech and Language", ICML 2023): grouped ``k x k``
    convolutions over the token grid, each followed by a LayerNorm without affine parameters and a
    GELU, residual from the second on, then a linear layer.

    Args:
        in_dim: Width of the tokens it reads (the encoder's).
        dim: Its own width.
        depth: Convolution layers.
        kernel: Convolution size (odd).
        groups: Convolution groups (data2vec 2.0: 16); cut to what divides both widths.
        out_dim: Width of the predictions (default ``in_dim``, data2vec 2.0's).

    Example:
        >>> ConvDecoder(32, 16, 2)(torch.randn(2, 49, 32), (7, 7)).shape
        torch.Size([2, 49, 32])

    """

    def __init__(self, in_dim: int, dim: int, depth: int, kernel: int = 3, groups: int = 16,
                 out_dim: int | None = None) -> None:
        """Build ``depth`` convolution layers and the output projection to ``out_dim`` (default ``in_dim``)."""
        super().__init__()
        self.convs = nn.ModuleList()
        for i in range(depth):
            width = in_dim if i == 0 else dim
            g = math.gcd(groups, math.gcd(width, dim))
            self.convs.append(nn.Conv2d(width, dim, kernel, padding=kernel // 2, groups=g))
        self.proj = nn.Linear(dim if depth else in_dim, out_dim or in_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predictions ``[N, L, out_dim]`` of tokens ``[N, L, in_dim]`` laid out on ``grid`` (row-major)."""
        n, length, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(n, d, *grid)
        for i, conv in enumerate(self.convs):
            y = conv(x)
            y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2]).permute(0, 3, 1, 2)
            y = F.gelu(y)
            x = y if i == 0 else x + y
        return self.proj(x.flatten(2).transpose(1, 2))
