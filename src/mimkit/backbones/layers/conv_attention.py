"""CvT's transformer block: attention with depthwise-convolutional q/k/v projections.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from mimkit.backbones.layers.cpu_kernels import attention_kernel, bf16_on_cpu, depthwise_conv2d, no_inner_window
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.partial_conv import window_count
from mimkit.backbones.layers.sparse import Packed, SparseStage, batch_norm_where


class ConvProjection(nn.Module):
    """Depthwise 3x3 conv + BatchNorm on the token map, then flattened back to tokens.

    ``stride`` 2 shrinks the key/value maps 4x (CvT's squeezed projection), which is what keeps
    attention affordable at the high-resolution first stage.
    """

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution alone: ``[N, D, H, W]`` to ``[N, D, ceil(H / s), ceil(W / s)]``."""
        stride, padding = self.conv.stride[0], self.conv.padding[0]
        if stride > 1 and bf16_on_cpu(x) and not no_inner_window(x, self.conv.kernel_size[0], stride, padding):
            # The stride-1 conv sampled every `stride` pixels: the same numbers. PyTorch's CPU backward
            # of a strided depthwise conv takes a slow path in bf16, slow enough to make the whole
            # CvT-MAE step slower in bf16 than in fp32; in fp32 the strided kernel is the faster one
            # (BENCHMARKS.md, section 10).
            return F.conv2d(x, self.conv.weight, None, 1, padding, 1, self.conv.groups)[..., ::stride, ::stride]
        return depthwise_conv2d(x, self.conv.weight, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D, H, W]`` map to ``[N, ceil(H / s) * ceil(W / s), D]`` tokens (``s`` the stride)."""
        return self.bn(self.conv_map(x)).flatten(2).transpose(1, 2)


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

    def forward(self, x: torch.Tensor, height: int, width: int, labels: torch.Tensor | None = None,
                sparse: SparseStage | None = None) -> torch.Tensor:
        """Attend over tokens ``x [N, H*W, D]`` laid out on an ``height x width`` map.

        With ``labels`` (``[N or 1, H, W]``, 0/1: which of two mixed images each token shows), no
        token sees the other image: each query's conv window reads only its own label's tokens, keys
        and values are computed once per label (``2 H'W'`` of them, each from its label's tokens
        only), and a query attends only to keys of its label whose window held a token of it.

        With ``sparse``, ``x`` is ``[N, L, D]``: the visible tokens of ``sparse.tokens``. The
        projections' convolutions read the hidden positions as zeros, their BatchNorm counts the
        visible tokens (and, for keys and values, the windows that hold one) only, and a query
        attends to those windows only, so nothing hidden reaches a visible token.
        """
        n, length, d = x.shape
        if sparse is not None:
            if labels is not None:
                raise ValueError("a mixed input (labels) and the sparse mode cannot be combined")
            q, k, v, mask = self._sparse(x, sparse)
        elif labels is None:
            fmap = x.transpose(1, 2).reshape(n, d, height, width)
            q, k, v = self.conv_q(fmap), self.conv_k(fmap), self.conv_v(fmap)
            mask = None
        else:
            q, k, v, mask = self._separated(x.transpose(1, 2).reshape(n, d, height, width), labels)
        q = self._heads(self.proj_q(q))  # [N, h, HW, D/h]
        k = self._heads(self.proj_k(k))  # [N, h, H'W' (x2 with labels), D/h]
        v = self._heads(self.proj_v(v))
        with attention_kernel(x, q.shape[-2], k.shape[-2]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, h, HW, D/h]
        return self.proj(out.transpose(1, 2).reshape(n, length, d))

    def _separated(self, fmap: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v tokens and a boolean attention mask ``[N or 1, 1, HW, 2 H'W']`` that keep two
        mixed images apart (see :meth:`forward`).
        """
        groups = [(labels == g).unsqueeze(1).to(fmap.dtype) for g in (0, 1)]  # [N|1, 1, H, W]
        q = self.conv_q.bn(sum(self.conv_q.conv_map(fmap * m) * m for m in groups))
        q = q.flatten(2).transpose(1, 2)

        conv = self.conv_k.conv
        filled = torch.cat([window_count(m, conv.kernel_size[0], conv.stride[0], conv.padding[0]).flatten(1) > 0
                            for m in groups], dim=1)  # [N|1, 2H'W']: windows that hold a token of their label
        key_label = torch.arange(2, device=fmap.device).repeat_interleave(filled.shape[1] // 2)
        mask = (labels.flatten(1).unsqueeze(-1) == key_label) & filled.unsqueeze(1)  # [N|1, HW, 2H'W']
        keep = filled.expand(fmap.shape[0], -1)

        def keys(proj: ConvProjection) -> torch.Tensor:
            # each label's keys from its own tokens; the BatchNorm statistics over the filled windows
            # only, so that the empty half of each label's map does not pull them towards zero
            tokens = torch.cat([proj.conv_map(fmap * m).flatten(2) for m in groups], dim=2).transpose(1, 2)
            return batch_norm_where(proj.bn, tokens, keep)

        k, v = keys(self.conv_k), keys(self.conv_v)
        return q, k, v, mask.unsqueeze(1)

    def sparse_stage(self, visible: torch.Tensor) -> SparseStage:
        """The packing of a stage whose visible tokens are ``visible [N, 1, H, W]`` (nonzero = visible):
        those tokens, and the key/value windows that hold at least one of them.
        """
        conv = self.conv_k.conv
        filled = window_count(visible, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        return SparseStage(Packed.of(visible), Packed.of(filled))

    def _sparse(self, x: torch.Tensor, sparse: SparseStage) -> tuple[torch.Tensor, ...]:
        """q, k, v of the visible tokens ``x [N, L, D]`` and the attention mask ``[N, 1, 1, L_k]`` of
        their key windows (see :meth:`forward`); None when no image's keys hold padding.
        """
        queries, windows = sparse.tokens, sparse.keys
        fmap = queries.scatter(x)  # [N, D, H, W], zero where hidden
        q = batch_norm_where(self.conv_q.bn, queries.gather(self.conv_q.conv_map(fmap)), queries.valid, queries.count)
        k, v = (batch_norm_where(p.bn, windows.gather(p.conv_map(fmap)), windows.valid, windows.count)
                for p in (self.conv_k, self.conv_v))
        if not windows.padded:  # every packed key is a real window: nothing to mask
            return q, k, v, None
        # An image with nothing visible has no key window: its (padding) rows attend to its empty keys
        # rather than to none, which some attention kernels answer with NaN.
        keys = windows.valid | ~windows.valid.any(dim=1, keepdim=True)
        return q, k, v, keys[:, None, None, :]


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

    def forward(self, x: torch.Tensor, height: int, width: int, labels: torch.Tensor | None = None,
                sparse: SparseStage | None = None) -> torch.Tensor:
        """Tokens ``[N, H*W, D]`` of an ``height x width`` map to tokens of the same shape
        (``labels``: keep two mixed images apart; ``sparse``: ``x`` holds the visible tokens ``[N, L, D]``
        alone; see :meth:`ConvAttention.forward`).
        """
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, labels, sparse))
        return x + self.drop_path(self.mlp(self.norm2(x)))
