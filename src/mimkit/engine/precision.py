"""Mixed-precision choice: bf16 only where the hardware computes it natively, fp16 with a gradient scaler
on GPUs without it, fp32 elsewhere.

fp16's five exponent bits underflow small gradients, so an fp16 run multiplies the loss by a scale
before the backward pass and divides the gradients by it before the optimizer sees them, lowering
the scale when a gradient overflows (Micikevicius et al., "Mixed Precision Training", ICLR 2018);
:func:`grad_scaler` gives the scaler, the training step uses it. bf16 has fp32's exponent range and
needs none.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without it PyTorch emulates bf16 matmuls, which on an AVX2-only CPU measured ~70x slower than
    fp32 (1.3 vs 87 GFLOP/s), so bf16 autocast would be a large slowdown, not a speed-up.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into what ``device`` computes fastest without losing the run.

    On CUDA: ``bf16`` where the GPU computes it natively (Ampere and later), else ``fp16`` with a
    gradient scaler (a T4 or V100, where ``torch.cuda.is_bf16_supported()`` alone would count
    emulated bf16, several times slower). On a CPU: ``bf16`` with AVX512-BF16 or AMX, else ``fp32``
    (emulated bf16 is far slower than fp32 there, and fp16 has no fast CPU path either). Anything
    else: ``fp32``. An explicit ``bf16``, ``fp16`` or ``fp32`` is kept as given.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on ``device`` for ``bf16`` / ``fp16`` (or ``auto`` resolving to one), else nothing."""
    dtype = _DTYPES.get(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The loss scaler an ``fp16`` step needs (``torch.amp.GradScaler`` on ``device``); None for any other precision."""
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
