"""The one training step: the trainer, the profiler and every benchmark call :func:`train_step`.

A step is: each micro-batch forward under autocast and backward (DDP synchronises only on the
last; in fp16 on the loss times the gradient scaler's scale, the gradients divided by it afterwards),
one check that every loss and the gradient norm are finite (the same verdict on every rank), then
the method's ``before_optimizer_step``, the scheduled lr and weight decay, clipping (the global
gradient norm, or each parameter's as DINO does), the optimizer and the method's ``after_step``
(``discard_step`` instead, when the step was skipped). An fp16 step that overflows is skipped the same
way, and the scaler lowers its scale for the next one.
The phases are ``record_function`` ranges, so a profile attributes time to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from mimkit.config import CLIP_MODES
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
                     sync: bool = True, scaler: torch.amp.GradScaler | None = None) -> PretrainOutput:
    """Forward one batch under autocast and add ``scale x loss``'s gradient to the parameters.

    Args:
        model: The method, or its DDP wrapper (then ``sync=False`` skips the gradient all-reduce).
        batch: On any device; it is moved to ``device`` as a whole.
        device: Where the model is.
        precision: ``bf16``, ``fp16`` or ``fp32`` (resolved).
        scale: ``1 / accumulation steps``, so that micro-batches add up to the batch mean.
        sync: Whether DDP all-reduces this backward (the last micro-batch of a step).
        scaler: fp16's loss scaler: the gradient added is then ``scaler.get_scale()`` times larger.

    """
    batch = batch.to(device)
    no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with record_function("forward"), autocast(device, precision):
            out = model(batch)
        with record_function("backward"):
            loss = out.loss * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return out


def clip_grad_per_param_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to ``max_norm``, in place.

    The per-parameter clipping of Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", ICCV 2021 (DINO's ``clip_gradients``): each gradient is multiplied by
    ``max_norm / (norm + 1e-6)`` when that is below 1 and left as it is otherwise. A large gradient of
    one parameter then no longer shrinks the others', as one global norm would.

    Args:
        grads: The gradients (on one device), modified in place.
        max_norm: The bound on each gradient's norm.

    Returns:
        The total norm of all gradients before clipping, float32 0-d.

    Example:
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
        >>> round(float(clip_grad_per_param_(g, 1.0)), 4), [round(float(x.norm()), 4) for x in g]
        (5.0249, [1.0, 0.5])

    """
    if not grads:
        return torch.zeros(())
    # float32 norms: a bf16 gradient's squared sum loses precision, and the clip is decided on it.
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    total = torch.linalg.vector_norm(norms)
    coefs = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return total


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
    clip_mode: str = "global",
    info: DistInfo | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    Args:
        model: What is called: the method, its DDP wrapper or a compiled one.
        method: The method itself (parameters, ``after_step``).
        micro_batches: The step's batches; their mean gradient is applied.
        optimizer: Built by :func:`mimkit.engine.optim.build_optimizer`.
        device: Where the model is.
        precision: ``bf16``, ``fp16`` or ``fp32`` (resolved).
        lr: This step's scheduled learning rate (each group's ``lr_scale`` applies on top).
        step: Optimizer steps taken so far.
        total_steps: The schedule's current length.
        clip_grad: Clip the gradient norm to this; 0 measures it without clipping.
        clip_mode: ``global`` clips the norm of all gradients together; ``per_param`` clips each
            parameter's gradient norm on its own (DINO's, :func:`clip_grad_per_param_`).
        info: The DDP job, for a verdict on finiteness shared by every rank.
        scaler: fp16's loss scaler (:func:`mimkit.engine.precision.grad_scaler`): the gradients are
            unscaled before they are measured and clipped, and the scale is updated after the step,
            lowered when it overflowed.

    Returns:
        A :class:`StepResult`; the gradients are zero afterwards either way.

    Raises:
        ValueError: ``clip_mode`` is neither ``global`` nor ``per_param``.

    """
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
    n = len(micro_batches)
    loss = torch.zeros((), device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for i, batch in enumerate(micro_batches):
        out = forward_backward(model, batch, device, precision, 1.0 / n, sync=i == n - 1, scaler=scaler)
        # Every micro-batch must be finite: one NaN would poison the accumulated gradient.
        finite &= torch.isfinite(out.loss.detach().float())
        loss += out.loss.detach().float() / n
    with record_function("optimizer"):
        if scaler is not None:  # the norm, the clip and the method's own gradient edits see true gradients
            scaler.unscale_(optimizer)
        method.before_optimizer_step(step, total_steps)
        params = [p for p in method.parameters() if p.grad is not None]
        # The norm is taken even without clipping: a finite loss can still give an inf gradient.
        if clip_grad <= 0:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        elif clip_mode == "per_param":
            norm = clip_grad_per_param_([p.grad for p in params], clip_grad)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        finite &= torch.isfinite(norm)
        # Every rank must take the same decision, or DDP would deadlock on the next step.
        taken = bool(all_reduce_mean(finite.float(), info) == 1.0) if info is not None else bool(finite)
        if taken:
            apply_schedules(optimizer, lr, step / max(1, total_steps))
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:  # an overflow was recorded by unscale_: the scale is lowered
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if taken:
            method.after_step(step, total_steps)
        else:
            method.discard_step()
    return StepResult(taken, loss, norm, out, sum(b.size for b in micro_batches))


__all__ = ["PHASES", "StepResult", "clip_grad_per_param_", "forward_backward", "train_step"]
