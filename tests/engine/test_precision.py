from __future__ import annotations

import contextlib

import pytest
import torch

from mimkit.engine import precision
from mimkit.engine.distributed import DistInfo, all_reduce_mean, init_distributed, resolve_device
from mimkit.errors import ConfigError


def test_explicit_precision_is_kept():
    cpu = torch.device("cpu")
    assert precision.resolve_precision("fp32", cpu) == "fp32"
    assert precision.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_takes_bf16_only_where_native(monkeypatch, native, expected):
    """A T4 or V100 emulates bf16 (``is_bf16_supported()`` alone says yes): fp16 with a scaler instead."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda")
    assert precision.resolve_precision("auto", cuda) == expected
    assert (precision.grad_scaler(cuda, "auto") is not None) == (expected == "fp16")
    assert precision.resolve_precision("fp32", cuda) == "fp32"


def test_only_fp16_gets_a_grad_scaler(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert [precision.grad_scaler(cpu, p) is None for p in ("auto", "bf16", "fp32")] == [True] * 3
    assert isinstance(precision.grad_scaler(cpu, "fp16"), torch.amp.GradScaler)
    with precision.autocast(cpu, "fp16"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.float16


def test_autocast_context(monkeypatch):
    cpu = torch.device("cpu")
    assert isinstance(precision.autocast(cpu, "fp32"), contextlib.nullcontext)
    with precision.autocast(cpu, "bf16"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    with precision.autocast(cpu, "auto"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.float32


def test_single_process_distributed(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")
    value = torch.tensor(3.0)
    assert all_reduce_mean(value, info) is value
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.device_count() > 1:
        assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match=f"device '{name}' .* no CUDA GPU is visible; use cpu or auto"):
                resolve_device(name)
    assert not DistInfo(rank=1, world_size=2).is_main
