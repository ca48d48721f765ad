"""The EMA teacher, tested once over every registered method that has one and every backbone family."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import METHOD_BACKBONE_PAIRS, family, method_batch, tiny_backbone_kwargs, tiny_method_cfg
from torch.nn.modules.batchnorm import _BatchNorm

from mimkit.backbones import create_backbone
from mimkit.config import OptimConfig
from mimkit.engine.optim import build_optimizer
from mimkit.engine.step import train_step
from mimkit.methods import METHODS, create_method
from mimkit.methods.teacher import (
    TeacherStudent,
    cosine_momentum,
    ema_update,
    frozen_copy,
    linear_momentum,
    teacher_train,
)


def _first_of_each_family(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for name, backbone in pairs:
        if (name, family(backbone)) not in seen:
            seen.add((name, family(backbone)))
            out.append((name, backbone))
    return out


#: Every method with a teacher, on the first backbone of each family it takes (the CvT brings BatchNorm).
TEACHER_PAIRS = _first_of_each_family([(m, b) for m, b in METHOD_BACKBONE_PAIRS
                                       if issubclass(METHODS[m], TeacherStudent)])


def test_every_teacher_method_is_covered():
    assert {m for m, _ in TEACHER_PAIRS} >= {"dino", "ibot", "data2vec", "data2vec2"}
    assert len({family(b) for _, b in TEACHER_PAIRS}) >= 2


def _build(name: str, backbone: str, seed: int = 0):
    torch.manual_seed(seed)
    kwargs, img = tiny_backbone_kwargs(backbone, in_chans=1)
    return create_method(tiny_method_cfg(name, img, backbone), create_backbone(backbone, **kwargs)), img


def _batch(method, img: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return method_batch(method, torch.randn(4, 1, img, img, generator=g))


def _teacher_params(method) -> list[torch.Tensor]:
    return [p for _, t in method.teacher_pairs() for p in t.parameters()]


@pytest.mark.parametrize("name, backbone", TEACHER_PAIRS)
def test_no_gradient_reaches_the_teacher(name, backbone):
    method, img = _build(name, backbone)
    method.train()
    method(_batch(method, img)).loss.backward()
    teacher = _teacher_params(method)
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    optimized = {id(p) for g in build_optimizer(method, OptimConfig(), 1e-3).param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher}, "a teacher parameter is in the optimizer"


@pytest.mark.parametrize("name, backbone", TEACHER_PAIRS)
def test_the_teacher_stays_in_eval_except_batchnorm(name, backbone):
    method, _ = _build(name, backbone)
    for mode in (True, False):
        method.train(mode)
        for student, teacher in method.teacher_pairs():
            assert student.training is mode
            for m in teacher.modules():
                assert m.training is (mode and isinstance(m, _BatchNorm)), type(m).__name__


@pytest.mark.parametrize("name, backbone", TEACHER_PAIRS)
def test_the_update_moves_the_teacher_towards_the_student(name, backbone):
    method, img = _build(name, backbone)
    method.train()
    method(_batch(method, img))  # the teacher's BatchNorm statistics move: they must stay its own
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        for m in method.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.add_(1.0)
    before = [(copy.deepcopy(s.state_dict()), copy.deepcopy(t.state_dict())) for s, t in method.teacher_pairs()]
    method.after_step(3, 10)
    m = method.momentum(3 / 10)
    assert 0.0 < m < 1.0
    moved = 0
    for (s_before, t_before), (_, teacher) in zip(before, method.teacher_pairs(), strict=True):
        after = teacher.state_dict()
        for key, value in after.items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(value, t_before[key]), f"{key}: the teacher's BatchNorm statistics were replaced"
            elif value.is_floating_point() and any(key == k for k, _ in teacher.named_parameters()):
                expected = torch.lerp(t_before[key], s_before[key], 1.0 - m)
                torch.testing.assert_close(value, expected, msg=f"{key} is not the EMA of the student")
                moved += int(not torch.equal(value, t_before[key]))
    assert moved > 0


@pytest.mark.parametrize("name, backbone", TEACHER_PAIRS)
def test_encoder_loaded_resets_the_teacher(name, backbone):
    method, _ = _build(name, backbone)
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.copy_(torch.randn_like(p))  # as if init= had loaded another run's encoder
    method.encoder_loaded()
    for student, teacher in method.teacher_pairs():
        s, t = student.state_dict(), teacher.state_dict()
        assert all(torch.equal(s[k], t[k]) for k in s), "the teacher did not start from the loaded student"


def _steps(method, optimizer, img: int, start: int, count: int) -> None:
    for step in range(start, start + count):
        torch.manual_seed(100 + step)  # the engine's RNG state, as a checkpoint restores it
        train_step(method, method, [_batch(method, img, seed=step)], optimizer, device=torch.device("cpu"),
                   precision="fp32", lr=1e-3, step=step, total_steps=10)


@pytest.mark.parametrize("name, backbone", TEACHER_PAIRS)
def test_kill_and_resume_give_the_same_teacher(name, backbone):
    """Three steps straight against two steps, a restart from the saved state, and a third step."""
    straight, img = _build(name, backbone)
    straight.train()
    opt = build_optimizer(straight, OptimConfig(), 1e-3)
    _steps(straight, opt, img, 0, 2)
    saved, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    _steps(straight, opt, img, 2, 1)

    resumed, _ = _build(name, backbone, seed=7)  # other initial weights: everything must come from the state
    resumed.load_state_dict(saved)
    resumed.train()
    opt2 = build_optimizer(resumed, OptimConfig(), 1e-3)
    opt2.load_state_dict(saved_opt)
    _steps(resumed, opt2, img, 2, 1)
    a, b = straight.state_dict(), resumed.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed differs in {differ[:5]}"


def test_ema_update_is_one_lerp_and_copies_other_buffers():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    student.register_buffer("index", torch.arange(3))
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.index.add_(5)
        student[1].running_mean.add_(2.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update([(student, teacher)], 0.75)
    for b, s, t in zip(before, student.parameters(), teacher.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    assert torch.equal(teacher.index, student.index)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3)), "BatchNorm keeps the teacher's statistics"
    teacher_train(teacher, True)
    assert not teacher[0].training and teacher[1].training


def test_momentum_schedules():
    assert cosine_momentum(0.0, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(0.5, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(2.0, 0.99) == 1.0
    assert linear_momentum(0.0, 0.999, 0.9999, 0.5) == pytest.approx(0.999)
    assert linear_momentum(0.25, 0.999, 0.9999, 0.5) == pytest.approx(0.99945)
    assert linear_momentum(0.75, 0.999, 0.9999, 0.5) == 0.9999
    assert linear_momentum(0.3, 0.999, 0.9999, 0.0) == 0.9999
    assert all(not math.isnan(cosine_momentum(p / 10, 0.996)) for p in range(11))
