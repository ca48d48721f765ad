"""Kernel choices on a CPU, where three of PyTorch's kernels are slower than their stand-ins.

All were measured with ``benchmarks/bench_precision.py --kernel`` (BENCHMARKS.md, sections 10 and
31, have the timings): in bf16, PyTorch's CPU flash attention (forward + backward) is slower than the
math kernel on short sequences, the more so the shorter, and faster again on long ones (a ViT at
224 px); the backward of a strided depthwise conv is many times slower in bf16 than the stride-1 conv
it samples; and in any precision, oneDNN's depthwise conv is several times slower than a plain matrix
product on maps so small that every output window overlaps the padding (the 2x2 last stage of a
stride-4 CvT at 28 px).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
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


def no_inner_window(x: torch.Tensor, kernel: int, stride: int, padding: int) -> bool:
    """Whether ``x [N, C, H, W]`` is a CPU map on which no output window of a conv lies wholly inside.

    oneDNN's CPU depthwise conv is fast only when some window does (BENCHMARKS.md, section 31): on
    smaller maps, :func:`depthwise_conv2d` multiplies by a matrix instead.
    """
    def inner(size: int) -> bool:
        outputs = (size + 2 * padding - kernel) // stride + 1
        return any(padding <= o * stride <= size - kernel + padding for o in range(outputs))

    return x.device.type == "cpu" and not (inner(x.shape[-2]) and inner(x.shape[-1]))


@functools.lru_cache(maxsize=32)
def _tap_matrices(height: int, width: int, kernel: int, stride: int, padding: int,
                  device: torch.device) -> torch.Tensor:
    """0/1 ``[k*k, H*W, H'*W']``: which input pixel each kernel tap reads for each output pixel."""
    eye = torch.eye(height * width, device=device).view(height * width, 1, height, width)
    cols = F.unfold(eye, kernel, padding=padding, stride=stride)  # [HW (one-hot input), k*k, H'W']
    return cols.view(height * width, kernel * kernel, -1).transpose(0, 1).contiguous()


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """A bias-free depthwise conv, as ``F.conv2d(x, weight, None, stride, padding, groups=C)`` computes it.

    :func:`depthwise_matmul` on a CPU map with no inner output window (:func:`no_inner_window`),
    ``F.conv2d`` everywhere else.

    Args:
        x: ``[N, C, H, W]``.
        weight: ``[C, 1, k, k]``.
        stride: The conv's stride.
        padding: Zero padding on every side.

    Returns:
        ``[N, C, H', W']``, with ``H' = (H + 2 * padding - k) // stride + 1`` (likewise ``W'``).

    """
    if no_inner_window(x, weight.shape[-1], stride, padding):
        return depthwise_matmul(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])


def depthwise_matmul(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """A bias-free depthwise conv as a batched matrix product (arguments as :func:`depthwise_conv2d`).

    Each channel's conv is one linear map ``[H*W] -> [H'*W']``, the sum of the kernel's taps each
    times its 0/1 matrix of which pixel it reads for which output, so the forward and the backward are
    matrix products of ``H*W x H'*W'``: cheaper than the conv itself only on small maps.
    """
    n, c, h, w = x.shape
    k = weight.shape[-1]
    taps = _tap_matrices(h, w, k, stride, padding, x.device)  # [k*k, HW, H'W']
    maps = (weight.reshape(c, k * k) @ taps.to(weight.dtype).flatten(1)).view(c, h * w, -1)  # [C, HW, H'W']
    out = torch.bmm(x.reshape(n, c, h * w).transpose(0, 1), maps.to(x.dtype))  # [C, N, H'W']
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    return out.transpose(0, 1).reshape(n, c, h_out, w_out)
