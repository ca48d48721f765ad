"""The one training step: the trainer, the profiler and every benchmark call :func:`train_step`.

A step is: each micro-batch forward under autocast and backward (DDP synchronises only on the
last), one check that every loss and the gradient norm are finite (the same verdict on every rank),
then the method's ``before_optimizer_step``, the scheduled lr and weight decay, clipping, the optimizer
and the method's ``after_step`` (``discard_step`` instead, when the step was skipped).
The phases are ``record_function`` ranges, so a profile attributes time to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from mimkit.data.batch import Batch
from mimkit.engine.distributed import DistInfo, all_reduce_mean
from mimkit.engine.optim import apply_schedules
from mimkit.engine.precision import autocast
from mimkit.methods.base import PretrainMethod, PretrainOutput

PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class StepResult:
    """What one step did.

    Attributes:
        taken: False when a loss or the gradient was NaN/inf: nothing was applied.
        loss: Mean loss over the micro-batches, float32 0-d (on the step's device).
        grad_norm: Total gradient norm before clipping, 0-d.
        out: The last micro-batch's output (its ``logs`` are logged).
        images: Images in the step on this rank.

    """

    taken: bool
    loss: torch.Tensor
    grad_norm: torch.Tensor
    out: PretrainOutput
    images: int


def forward_backward(model: nn.Module, batch: Batch, device: torch.device, precision: str, scale: float = 1.0,
                     sync: bool = True) -> PretrainOutput:
    """Forward one batch under autocast and add ``scale x loss``'s gradient to the parameters.

    Args:
        model: The method, or its DDP wrapper (then ``sync=False`` skips the gradient all-reduce).
        batch: On any device; it is moved to ``device`` as a whole.
        device: Where the model is.
        precision: ``bf16`` or ``fp32`` (resolved).
        scale: ``1 / accumulation steps``, so that micro-batches add up to the batch mean.
        sync: Whether DDP all-reduces this backward (the last micro-batch of a step).

    """
    batch = batch.to(device)
    no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with record_function("forward"), autocast(device, precision):
            out = model(batch)
        with record_function("backward"):
            (out.loss * scale).backward()
    return out


def train_step(
    model: nn.Module,
    method: PretrainMethod,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    precision: str,
    lr: float,
    step: int,
    total_steps: int,
    clip_grad: float = 0.0,
    info: DistInfo | None = None,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    Args:
        model: What is called: the method, its DDP wrapper or a compiled one.
        method: The method itself (parameters, ``after_step``).
        micro_batches: The step's batches; their mean gradient is applied.
        optimizer: Built by :func:`mimkit.engine.optim.build_optimizer`.
        device: Where the model is.
        precision: ``bf16`` or ``fp32`` (resolved).
        lr: This step's scheduled learning rate (each group's ``lr_scale`` applies on top).
        step: Optimizer steps taken so far.
        total_steps: The schedule's current length.
        clip_grad: Clip the gradient norm to this; 0 measures it without clipping.
        info: The DDP job, for a verdict on finiteness shared by every rank.

    Returns:
        A :class:`StepResult`; the gradients are zero afterwards either way.

    """
    n = len(micro_batches)
    loss = torch.zeros((), device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for i, batch in enumerate(micro_batches):
        out = forward_backward(model, batch, device, precision, 1.0 / n, sync=i == n - 1)
        # Every micro-batch must be finite: one NaN would poison the accumulated gradient.
        finite &= torch.isfinite(out.loss.detach().float())
        loss += out.loss.detach().float() / n
    with record_function("optimizer"):
        method.before_optimizer_step(step, total_steps)
        params = [p for p in method.parameters() if p.grad is not None]
        # The norm is taken even without clipping: a finite loss can still give an inf gradient.
        norm = (torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad > 0
                else torch.nn.utils.get_total_norm([p.grad for p in params]))
        finite &= torch.isfinite(norm)
        # Every rank must take the same decision, or DDP would deadlock on the next step.
        taken = bool(all_reduce_mean(finite.float(), info) == 1.0) if info is not None else bool(finite)
        if taken:
            apply_schedules(optimizer, lr, step / max(1, total_steps))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if taken:
            method.after_step(step, total_steps)
        else:
            method.discard_step()
    return StepResult(taken, loss, norm, out, sum(b.size for b in micro_batches))


__all__ = ["PHASES", "StepResult", "forward_backward", "train_step"]
