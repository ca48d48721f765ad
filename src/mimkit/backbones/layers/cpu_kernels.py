"""Kernel choices for bf16 on a CPU, where two of PyTorch's kernels are slower than their stand-ins.

Both were measured with ``benchmarks/bench_precision.py --kernel`` (BENCHMARKS.md, section 10, has
the timings): in bf16, PyTorch's CPU flash attention (forward + backward) is slower than the math
kernel on short sequences, the more so the shorter, and faster again on long ones (a ViT at 224 px);
the backward of a strided depthwise conv is many times slower in bf16 than the stride-1 conv it
samples.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# The largest query x key product at which the math kernel was still measured the faster one in bf16
# (BENCHMARKS.md, section 10); above it, flash wins, so long sequences keep PyTorch's choice.
MATH_ATTENTION_MAX_SCORES = 160 * 160


def bf16_on_cpu(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs in bf16 on the CPU (a bf16 tensor, or CPU autocast to bf16)."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def attention_kernel(x: torch.Tensor, q_len: int, kv_len: int) -> contextlib.AbstractContextManager:
    """The context for ``scaled_dot_product_attention`` calls on ``x``'s device and precision.

    The math kernel for short sequences in bf16 on a CPU, PyTorch's own choice elsewhere. The
    backward of an attention call follows the kernel its forward chose, so wrapping the forward is
    enough.

    Args:
        x: Any tensor of the calls (its device, dtype and the autocast state decide).
        q_len: Query tokens per call.
        kv_len: Key / value tokens per call.

    Returns:
        ``sdpa_kernel(SDPBackend.MATH)`` or a null context.

    """
    if q_len * kv_len <= MATH_ATTENTION_MAX_SCORES and bf16_on_cpu(x):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
