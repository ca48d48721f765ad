from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mimkit.backbones import create_backbone
from mimkit.backbones.layers.cpu_kernels import (
    MATH_ATTENTION_MAX_SCORES,
    attention_kernel,
    bf16_on_cpu,
    depthwise_conv2d,
    depthwise_matmul,
    no_inner_window,
)
from mimkit.methods import create_method


def _attention_ops(fn) -> set[str]:
    """The attention operators a forward + backward of ``fn`` runs."""
    with torch.profiler.profile() as prof:
        fn().float().sum().backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_bf16_on_cpu_reads_dtype_and_autocast():
    x = torch.randn(2, 3)
    assert not bf16_on_cpu(x)
    assert bf16_on_cpu(x.bfloat16())
    with torch.autocast("cpu", torch.bfloat16):
        assert bf16_on_cpu(x)
    with torch.autocast("cpu", torch.float16):
        assert not bf16_on_cpu(x)


@pytest.mark.parametrize("length, math", [(16, True), (160, True), (161, False)])
def test_short_bf16_attention_uses_the_math_kernel(length, math):
    q = torch.randn(2, 2, length, 8, requires_grad=True)

    def run() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16), attention_kernel(q, length, length):
            return F.scaled_dot_product_attention(q, q, q)

    ops = _attention_ops(run)
    assert any("flash" in k for k in ops) != math, ops
    assert (length * length <= MATH_ATTENTION_MAX_SCORES) == math


def test_fp32_attention_is_left_to_pytorch():
    assert isinstance(attention_kernel(torch.randn(2, 3), 16, 16), contextlib.nullcontext)


def test_mae_under_cpu_bf16_runs_no_flash_kernel():
    """Encoder and decoder pick the math kernel for their short sequences, forward and backward."""
    torch.manual_seed(0)
    enc = create_backbone("vit_micro_p2", img_size=16, in_chans=1)
    mae = create_method({"name": "mae", "mask_ratio": 0.75}, enc)
    x = torch.randn(2, 1, 16, 16)

    def run() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            return mae(x).loss

    assert not any("flash" in k for k in _attention_ops(run))
    assert any("flash" in k for k in _attention_ops(lambda: mae(x).loss))  # fp32: PyTorch's choice


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 3), (3, 3), (1, 5), (4, 4), (5, 2)])
def test_depthwise_conv2d_equals_the_conv_forward_and_backward(size, stride):
    """The tap-matrix product computes the conv's numbers and gradients, whichever path runs."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(F.conv2d(x, w, None, stride, 1, 1, 4))
    for fn in (depthwise_conv2d, depthwise_matmul):
        out = fn(x, w, stride, 1)
        ref = F.conv2d(x, w, None, stride, 1, 1, 4)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad))


@pytest.mark.parametrize("side, stride, inner", [(1, 1, False), (2, 1, False), (2, 2, False), (3, 1, True),
                                                 (3, 2, False), (4, 2, True), (7, 2, True), (14, 1, True)])
def test_no_inner_window_is_the_slow_onednn_case(side, stride, inner):
    """The maps on which oneDNN was measured slow (BENCHMARKS.md, section 31) are the ones chosen."""
    x = torch.zeros(1, 1, side, side)
    assert no_inner_window(x, 3, stride, 1) != inner
    assert no_inner_window(torch.zeros(1, 1, side, 14), 3, stride, 1) != inner  # either side decides


def test_the_cvt_projection_takes_the_matmul_path_on_a_2x2_map():
    """A stride-4 CvT's 2x2 last stage runs no oneDNN depthwise conv, forward or backward."""
    from mimkit.backbones.layers.conv_attention import ConvProjection

    proj = ConvProjection(8, 2)
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    with torch.profiler.profile() as prof:
        proj(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::bmm" in ops and not any("convolution" in k for k in ops), ops
