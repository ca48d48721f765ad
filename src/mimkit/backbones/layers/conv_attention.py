"""CvT's transformer block: attention with depthwise-convolutional q/k/v projections.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from mimkit.backbones.layers.cpu_kernels import attention_kernel, bf16_on_cpu
from mimkit.backbones.layers.norm import layer_norm


class ConvProjection(nn.Module):
    """Depthwise 3x3 conv + BatchNorm on the token map, then flattened back to tokens.

    ``stride`` 2 shrinks the key/value maps 4x (CvT's squeezed projection), which is what keeps
    attention affordable at the high-resolution first stage.
    """

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D, H, W]`` map to ``[N, ceil(H / s) * ceil(W / s), D]`` tokens (``s`` the stride)."""
        stride = self.conv.stride[0]
        if stride > 1 and bf16_on_cpu(x):
            # The stride-1 conv sampled every `stride` pixels: the same numbers. PyTorch's CPU backward
            # of a strided depthwise conv takes a slow path in bf16 (up to 15x the stride-1 conv's
            # time), which made the whole CvT-MAE step 1.9x slower in bf16 than in fp32; in fp32 the
            # strided kernel is the faster one (BENCHMARKS.md, section 10).
            y = F.conv2d(x, self.conv.weight, None, 1, 1, 1, self.conv.groups)[..., ::stride, ::stride]
        else:
            y = self.conv(x)
        return self.bn(y).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention whose q (stride 1) and k, v (stride ``kv_stride``) come from conv projections."""

    def __init__(self, dim: int, num_heads: int, kv_stride: int = 2, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.conv_q = ConvProjection(dim, 1)
        self.conv_k = ConvProjection(dim, kv_stride)
        self.conv_v = ConvProjection(dim, kv_stride)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, d = t.shape
        return t.view(n, length, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Attend over tokens ``x [N, H*W, D]`` laid out on an ``height x width`` map."""
        n, length, d = x.shape
        fmap = x.transpose(1, 2).reshape(n, d, height, width)
        q = self._heads(self.proj_q(self.conv_q(fmap)))  # [N, h, HW, D/h]
        k = self._heads(self.proj_k(self.conv_k(fmap)))  # [N, h, H'W', D/h]
        v = self._heads(self.proj_v(self.conv_v(fmap)))
        with attention_kernel(x, q.shape[-2], k.shape[-2]):
            out = F.scaled_dot_product_attention(q, k, v)  # [N, h, HW, D/h]
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class ConvBlock(nn.Module):
    """Pre-norm transformer block with convolutional attention and an MLP (ratio 4, GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, kv_stride: int = 2,
                 drop_path: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = ConvAttention(dim, num_heads, kv_stride, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens ``[N, H*W, D]`` of an ``height x width`` map to tokens of the same shape."""
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x)))
