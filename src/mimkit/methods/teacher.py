"""The EMA teacher of the teacher-student methods, and its momentum schedules.

A teacher is a frozen copy of some of the student's modules (its encoder, its heads), moved towards
the student after every optimizer step: ``teacher = m * teacher + (1 - m) * student`` (Tarvainen and
Valpola, "Mean teachers are better role models", NeurIPS 2017; the momentum encoder of He et al.,
"Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020). DINO and iBOT use
it, with a cosine momentum; data2vec's linear anneal is here for the data2vec methods, which differ
from them only in that schedule and in what the teacher's outputs become.

Why not timm's ``ModelEmaV3`` (which the fine-tuning method uses for its weight average):

* The teacher is part of the method's forward pass and of its checkpoint, under the method's own
  names (``teacher_encoder.*``, which evaluation and export read); ``ModelEmaV3`` wraps a module of
  its own under ``module.``.
* Its BatchNorm layers keep their own running statistics, computed on the teacher's inputs with the
  teacher's weights; ``ModelEmaV3`` averages or copies every buffer.
* The momentum is a pure function of the schedule's progress, decided by the method (a cosine to 1,
  a linear anneal); ``ModelEmaV3`` keeps a decay with its own warm-up by step count.

The functions work on ``(student, teacher)`` module pairs that the method names; the state a resume
needs is the teacher's weights, which are in the method's ``state_dict``. :class:`TeacherStudent`
is what every teacher-student method shares on top of them: the teachers' train mode, their reset
when the student is loaded, and the step that moves them and advances the schedule's buffers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mimkit.methods.base import PretrainMethod

#: A student module and its teacher copy.
Pair = tuple[nn.Module, nn.Module]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that never takes a gradient (a teacher's starting point)."""
    return copy.deepcopy(module).requires_grad_(False)


def teacher_train(teacher: nn.Module, mode: bool) -> None:
    """Keep ``teacher`` in eval mode (no drop path, no dropout) except its BatchNorm layers, which follow ``mode``.

    DINO never puts its teacher in eval: a BatchNorm layer (the CvT's) normalises the teacher's
    inputs with their own batch statistics, and its running statistics come from the teacher's own
    weights and inputs, which is what evaluation then reads. Copying the student's would give the
    teacher statistics of other weights, mixed with other views.
    """
    teacher.eval()
    for m in teacher.modules():
        if isinstance(m, _BatchNorm):
            m.train(mode)


@torch.no_grad()
def ema_update(pairs: Sequence[Pair], momentum: float) -> None:
    """Move every teacher of ``pairs`` towards its student: one foreach lerp of all parameters.

    Other buffers (position indices, masks) are copied, not averaged, as timm's ``ModelEmaV3`` does;
    BatchNorm buffers stay the teacher's own (see :func:`teacher_train`).

    Args:
        pairs: ``(student, teacher)`` modules of the same structure.
        momentum: ``m`` in ``teacher = m * teacher + (1 - m) * student``; 1 leaves the teacher as it is.

    """
    teachers: list[torch.Tensor] = []
    students: list[torch.Tensor] = []
    for student, teacher in pairs:
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            teachers.append(pt)
            students.append(ps.detach())
        for ms, mt in zip(student.modules(), teacher.modules(), strict=True):
            if not isinstance(mt, _BatchNorm):
                for bs, bt in zip(ms.buffers(recurse=False), mt.buffers(recurse=False), strict=True):
                    bt.copy_(bs)
    if teachers:
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)


@torch.no_grad()
def reset_teacher(pairs: Sequence[Pair]) -> None:
    """Make every teacher of ``pairs`` its student again (after the student was loaded from another run)."""
    for student, teacher in pairs:
        teacher.load_state_dict(student.state_dict())


def cosine_momentum(progress: float, start: float) -> float:
    """DINO's momentum: a cosine from ``start`` at progress 0 to 1 at progress 1.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.

    Example:
        >>> cosine_momentum(0.0, 0.996), cosine_momentum(1.0, 0.996)
        (0.996, 1.0)

    """
    return 1.0 - (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def linear_momentum(progress: float, start: float, end: float, anneal_end: float) -> float:
    """data2vec's momentum: linear from ``start`` to ``end`` over the first ``anneal_end`` of progress, then ``end``.

    Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech, Vision and
    Language", ICML 2022.

    Example:
        >>> linear_momentum(0.5, 0.999, 0.9999, 1.0), linear_momentum(0.9, 0.999, 0.9999, 0.5)
        (0.99945, 0.9999)

    """
    if anneal_end <= 0 or progress >= anneal_end:
        return end
    return start + (end - start) * progress / anneal_end


class TeacherStudent(PretrainMethod):
    """A method with EMA teachers: DINO, iBOT, data2vec, data2vec 2.0.

    A subclass names its ``(student, teacher)`` pairs in :meth:`teacher_pairs` and its momentum
    schedule in :meth:`momentum`, and calls :meth:`add_schedule_state` in its constructor; the
    schedule's ``step`` and ``progress`` are buffers, so a resumed run continues bit for bit.
    """

    step: torch.Tensor
    progress: torch.Tensor

    def add_schedule_state(self) -> None:
        """The ``step`` and ``progress`` buffers that :meth:`advance_teacher` moves."""
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))

    def teacher_pairs(self) -> list[Pair]:  # pragma: no cover - abstract
        """The ``(student, teacher)`` modules the EMA moves."""
        raise NotImplementedError

    def momentum(self, progress: float) -> float:  # pragma: no cover - abstract
        """The teacher's EMA momentum at ``progress`` in [0, 1] of the schedule."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> TeacherStudent:
        """Train the student; the teachers stay in eval mode except their BatchNorm layers (:func:`teacher_train`)."""
        super().train(mode)
        for _, teacher in self.teacher_pairs():
            teacher_train(teacher, mode)
        return self

    def encoder_loaded(self) -> None:
        """The teachers start as the loaded student, as at initialisation."""
        reset_teacher(self.teacher_pairs())

    @torch.no_grad()
    def advance_teacher(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step``: move the teachers at that step's momentum, advance the buffers."""
        ema_update(self.teacher_pairs(), self.momentum(step / max(1, total_steps)))
        self.step.fill_(step + 1)
        self.progress.fill_(min(1.0, (step + 1) / max(1, total_steps)))


__all__ = ["Pair", "TeacherStudent", "cosine_momentum", "ema_update", "frozen_copy", "linear_momentum",
           "reset_teacher", "teacher_train"]
