from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mimkit.backbones import create_backbone
from mimkit.backbones.layers.cpu_kernels import MATH_ATTENTION_MAX_SCORES, attention_kernel, bf16_on_cpu
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
