"""MixedAE's homologous attention: each query attends to its ``K`` largest logits only.

Chen et al., "Mixed Autoencoder for Self-supervised Visual Representation Learning", CVPR 2023. With
``G`` images mixed into one sequence, ``K = L / G + 1`` (the own image's tokens and the class token,
when the attention recognises them). It has no parameters: the same weights run vanilla attention
at evaluation and fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn


def topk_attention_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the ``k`` largest logits of each row (ties broken by ``topk``'s
    index order, never by a threshold, which would keep more than ``k`` on ties).

    Args:
        logits: ``[..., T_q, T_k]`` attention logits.
        k: Keys kept per query, ``1 <= k <= T_k``.

    Returns:
        Bool of ``logits``'s shape with exactly ``k`` True per row.

    """
    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return keep.scatter_(-1, logits.topk(k, dim=-1).indices, True)


def homologous_attention(attn: nn.Module, x: torch.Tensor, k: int,
                         source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A timm ``Attention`` with MixedAE's homologous attention: per head, only each query's ``k``
    largest logits go through the softmax (computed in float32), the rest are dropped.

    Args:
        attn: A timm ``vision_transformer.Attention`` (its weights are used as they are).
        x: Tokens ``[B, T, D]``, class token first.
        k: Keys kept per query (``r * L + 1``: the own image's tokens and the class token).
        source: Optional ``[B, T - 1]`` image index of each patch token, to measure recognition.

    Returns:
        ``(output [B, T, D], recognition)``: the fraction of the patch keys selected by patch
        queries that come from the query's own image (a 0-d tensor; None without ``source``).

    """
    b, t, d = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, key, v = qkv.unbind(0)
    q, key = attn.q_norm(q), attn.k_norm(key)
    with torch.autocast(x.device.type, enabled=False):  # float32 logits: bf16 would turn near values into ties
        logits = (q.float() @ key.float().transpose(-2, -1)) * attn.scale  # [B, h, T, T]
        keep = topk_attention_mask(logits, k)
        weights = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    out = attn.attn_drop(weights).to(v.dtype) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, t, -1))
    if getattr(attn, "gate", None) is not None:  # timm's gated attention
        out = out * attn.gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    recognition = None
    if source is not None:
        with torch.no_grad():
            patches = keep[:, :, 1:, 1:]  # patch queries, patch keys
            same = (source.unsqueeze(-1) == source.unsqueeze(-2)).unsqueeze(1)  # [B, 1, L, L]
            recognition = (patches & same).sum().float() / patches.sum().clamp_min(1).float()
    return out, recognition


def homologous_block(block: nn.Module, x: torch.Tensor, k: int,
                     source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A timm ``vision_transformer.Block`` with its attention replaced by :func:`homologous_attention`.

    Returns:
        ``(tokens [B, T, D], recognition or None)``.

    """
    out, recognition = homologous_attention(block.attn, block.norm1(x), k, source)
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), recognition
