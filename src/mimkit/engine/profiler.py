"""Where a pre-training step spends its time: data, forward, backward, optimizer, and the top operators."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.autograd.profiler_util import FunctionEventAvg
from torch.profiler import ProfilerActivity, profile, record_function

from mimkit.config import PretrainConfig
from mimkit.data import build_dataset, build_loader
from mimkit.engine.distributed import resolve_device
from mimkit.engine.optim import build_optimizer, scaled_lr
from mimkit.engine.precision import grad_scaler, resolve_precision
from mimkit.engine.step import PHASES, train_step
from mimkit.models import method_from_config


@dataclass
class StepProfile:
    """Mean milliseconds per step of each phase, images/s, and the operators that cost the most."""

    phase_ms: dict[str, float]
    img_per_s: float
    top_ops: list[tuple[str, float, float]] = field(default_factory=list)
    """``(operator, self time ms per step, share of the step)``."""

    def table(self) -> str:
        """A Markdown summary."""
        total = sum(self.phase_ms.values())
        lines = [f"{self.img_per_s:.0f} img/s; {total:.1f} ms per step", "",
                 "| phase | ms/step | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in self.phase_ms.items()]
        lines += ["", "| operator (self time) | ms/step | share |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.1f} | {share:.0%} |" for name, ms, share in self.top_ops]
        return "\n".join(lines)


def profile_steps(cfg: PretrainConfig, steps: int = 5, warmup: int = 2, top: int = 15,
                  shapes: bool = False) -> StepProfile:
    """Profile ``steps`` training steps of ``cfg`` (after ``warmup`` unprofiled ones) with torch.profiler.

    The step is the engine's own :func:`~mimkit.engine.step.train_step` on batches from the same loader.

    Args:
        cfg: A validated config.
        steps: Profiled steps.
        warmup: Steps run first and not counted (allocator, kernel selection).
        top: How many operators to list.
        shapes: List an operator once per set of input shapes (``aten::convolution_backward
            [[256, 192, 2, 2], ...]``), which tells which layer a slow kernel belongs to.

    Returns:
        The :class:`StepProfile`.

    """
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    data = build_dataset(cfg.data, "train")
    method = method_from_config(cfg).to(device).train()
    loader = build_loader(data, cfg.data, cfg.optim.batch_size, train=True, seed=cfg.seed, views=method.views)
    optimizer = build_optimizer(method, cfg.optim, scaled_lr(cfg.optim, 1))
    batches = iter(loader)
    scaler = grad_scaler(device, precision)

    def step() -> int:
        with record_function("data"):
            batch = next(batches).to(device)
        result = train_step(method, method, [batch], optimizer, device=device, precision=precision,
                            lr=optimizer.param_groups[0]["lr"], step=0, total_steps=1,
                            clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode, scaler=scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result.images

    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        t0, seen = time.perf_counter(), 0
        for _ in range(steps):
            seen += step()
        elapsed = time.perf_counter() - t0
    events = prof.key_averages()
    phase_ms = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in PHASES}
    if shapes:
        events = prof.key_averages(group_by_input_shape=True)
    phase_ms = {k: phase_ms.get(k, 0.0) for k in PHASES}
    step_ms = elapsed * 1e3 / steps
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: getattr(e, attr), reverse=True)
    def name(e: FunctionEventAvg) -> str:
        return f"{e.key} {e.input_shapes}".replace("[], ", "").replace(", []", "") if shapes else e.key

    top_ops = [(name(e), getattr(e, attr) / 1e3 / steps, getattr(e, attr) / 1e3 / steps / step_ms) for e in ops[:top]]
    return StepProfile(phase_ms, seen / elapsed, top_ops)
