from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEACHER_STUDENT, four_views, tiny_teacher_student

from mimkit.config import OptimConfig
from mimkit.data import Batch
from mimkit.engine.optim import build_optimizer
from mimkit.engine.step import train_step
from mimkit.errors import ConfigError
from mimkit.methods.dino import DINO, dino_loss
from mimkit.methods.heads import DINOHead
from mimkit.methods.losses import koleo_loss
from mimkit.models import load_config

SMALL = {"name": "dino", **TINY_TEACHER_STUDENT}


def _dino(backbone: str = "vit_tiny_p4", **cfg) -> DINO:
    return tiny_teacher_student("dino", backbone, **cfg)


_batch = four_views


def test_loss_is_the_mean_over_pairs_of_different_views():
    torch.manual_seed(0)
    s = [torch.randn(3, 5) for _ in range(4)]
    t = [F.softmax(torch.randn(3, 5), -1) for _ in range(2)]
    want = [-(t[i] * F.log_softmax(s[v] / 0.1, -1)).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    torch.testing.assert_close(dino_loss(s, t, 0.1), torch.stack(want).mean())
    assert len(want) == 6  # 2 * (4 - 1): a teacher view is never matched with its own student view


@pytest.mark.parametrize("backbone", ["vit_tiny_p4", "cvt_tiny_s4"])
def test_teacher_takes_no_gradient_and_stays_in_eval(backbone):
    dino = _dino(backbone).train()
    assert not dino.teacher_encoder.training and not dino.teacher_head.training
    dino(_batch()).loss.backward()
    assert all(p.grad is None for p in dino.teacher_encoder.parameters())
    assert all(p.grad is None for p in dino.teacher_head.parameters())
    assert all(p.grad is not None for p in dino.encoder.parameters() if p.requires_grad)
    assert dino.eval_module is dino.teacher_encoder


def test_the_cvt_teachers_batchnorm_keeps_its_own_statistics():
    dino = _dino("cvt_tiny_s4").train()
    bns = [m for m in dino.teacher_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.training for m in bns)  # batch statistics of the teacher's own global views
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        dino.teacher_logits(_batch().views[:2])
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(bns, before, strict=True))
    dino(_batch()).loss.backward()
    teacher_stats = [m.running_mean.clone() for m in bns]
    dino.after_step(0, 10)  # the student's statistics (of other weights, and the local crops) are not copied
    student_bns = [m for m in dino.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m, want, s in zip(bns, teacher_stats, student_bns, strict=True):
        assert torch.equal(m.running_mean, want) and not torch.equal(m.running_mean, s.running_mean)
    dino.eval()
    assert not any(m.training for m in bns)


def test_head_logits_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(8, 64, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head.embed(x)
        logits = head.last_layer(z)
    assert z.dtype == torch.float32 and logits.dtype == torch.float32
    w = F.normalize(head.last_v.double(), dim=1)
    torch.testing.assert_close(logits.double(), z.double() @ w.T, rtol=0, atol=1e-6)  # not bf16's 4e-3


def test_after_step_moves_centre_and_teacher_as_dino_does():
    dino = _dino(center_momentum=0.9, momentum=0.99).train()
    batch = _batch()
    with torch.no_grad():
        t = dino.teacher_logits(batch.views[:2])
    teacher_before = [p.clone() for p in dino.teacher_encoder.parameters()]
    dino(batch).loss.backward()
    with torch.no_grad():  # move the student so that the EMA is visible
        for p in dino.encoder.parameters():
            p.add_(0.1)
    dino.after_step(0, 10)
    torch.testing.assert_close(dino.center.value, 0.1 * t.mean(0, keepdim=True))
    for pt, before, ps in zip(dino.teacher_encoder.parameters(), teacher_before, dino.encoder.parameters(),
                              strict=True):
        torch.testing.assert_close(pt, 0.99 * before + 0.01 * ps)
    assert int(dino.step) == 1 and float(dino.progress) == pytest.approx(0.1)


def test_schedules():
    dino = _dino(teacher_temp=0.04, teacher_temp_final=0.07, teacher_temp_warmup=0.5, momentum=0.996)
    assert dino.teacher_temp(0.0) == pytest.approx(0.04)
    assert dino.teacher_temp(0.25) == pytest.approx(0.055)
    assert dino.teacher_temp(0.9) == pytest.approx(0.07)
    assert dino.momentum(0.0) == pytest.approx(0.996)
    assert dino.momentum(0.5) == pytest.approx(0.998)
    assert dino.momentum(1.0) == pytest.approx(1.0)


def test_last_layer_is_frozen_for_its_steps_then_trains():
    """DINO's freeze: no gradient reaches the optimizer, so the layer, its AdamW state and its decay stay untouched."""
    dino = _dino(freeze_last_layer=0.2).train()  # steps 0 and 1 of 10
    opt = build_optimizer(dino, OptimConfig(weight_decay=0.04), 1e-2)
    last = dino.head.last_v.detach().clone()
    for step in range(2):
        train_step(dino, dino, [_batch(seed=step)], opt, device=torch.device("cpu"), precision="fp32", lr=1e-2,
                   step=step, total_steps=10)
        assert torch.equal(dino.head.last_v, last) and dino.head.last_v not in opt.state
    assert dino.head.mlp[0].weight in opt.state  # the rest of the head trains
    train_step(dino, dino, [_batch(seed=5)], opt, device=torch.device("cpu"), precision="fp32", lr=1e-2,
               step=2, total_steps=10)
    assert not torch.equal(dino.head.last_v, last) and opt.state[dino.head.last_v]["step"] == 1


def test_a_skipped_step_leaves_nothing_pending_and_init_reaches_the_teacher():
    dino = _dino().train()
    dino(_batch())
    dino.discard_step()
    dino.after_step(0, 10)
    assert torch.equal(dino.center.value, torch.zeros_like(dino.center.value))  # the skipped batch never reached it
    with torch.no_grad():
        for p in dino.encoder.parameters():
            p.add_(1.0)
    dino.encoder_loaded()
    assert all(torch.equal(a, b) for a, b in zip(dino.encoder.parameters(), dino.teacher_encoder.parameters(),
                                                  strict=True))


def test_head_is_a_cosine_classifier_with_norm_last_layer():
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4)
    z = head.embed(torch.randn(3, 8))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    logits = head.last_layer(z)
    assert float(logits.detach().abs().max()) <= 1.0 + 1e-5
    assert not head.last_g.requires_grad
    assert DINOHead(8, 5, 16, 4, norm_last_layer=False).last_g.requires_grad


def test_state_dict_holds_every_piece_of_state_for_an_exact_resume():
    a = _dino().train()
    opt = build_optimizer(a, OptimConfig(), 1e-3)
    for step in range(3):
        train_step(a, a, [_batch(seed=step)], opt, device=torch.device("cpu"), precision="fp32", lr=1e-3,
                   step=step, total_steps=10)
    assert {"center.value", "step", "progress"} <= set(a.state_dict())
    b = _dino()
    b.load_state_dict(a.state_dict())
    b.train()
    torch.testing.assert_close(a(_batch(seed=9)).loss, b(_batch(seed=9)).loss, rtol=0, atol=0)


def test_param_groups_follow_dinos_weight_decay_schedule():
    dino = _dino(weight_decay_end=0.4)
    groups = dino.param_groups(0.04)
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay_end"] == 0.4
    names = {id(p): n for n, p in dino.named_parameters()}
    assert "encoder.cls_token" in {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert not any(names[id(p)].startswith("teacher") for g in groups for p in g["params"])


def test_collapse_is_reported_with_what_to_change(caplog):
    dino = _dino(collapse_check_every=1, teacher_temp_warmup=0.0).train()
    dino(_batch())
    dino._entropies = (0.999, 0.5)  # a uniform teacher
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.dino"):
        dino.after_step(0, 10)
    assert "outputs are uniform" in caplog.text and "teacher_temp_final" in caplog.text
    caplog.clear()
    dino(_batch())
    dino._entropies = (0.5, 0.01)  # one prototype for every image
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.dino"):
        dino.after_step(1, 10)
    assert "one prototype takes every image" in caplog.text
    caplog.clear()
    dino(_batch())  # a fresh teacher is neither
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.dino"):
        dino.after_step(2, 10)
    assert "collapse" not in caplog.text


def test_a_short_run_is_checked_for_collapse_twenty_times(caplog):
    dino = _dino(teacher_temp_warmup=0.0).train()  # collapse_check_every=100, more than the run
    for step, checked in ((0, False), (1, True)):  # 40 steps: every second one
        dino(_batch())
        dino._entropies = (0.999, 0.5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mimkit.methods.dino"):
            dino.after_step(step, 40)
        assert ("outputs are uniform" in caplog.text) is checked


def test_logs_report_entropy_as_a_fraction_of_log_k():
    out = _dino().train()(_batch())
    assert 0.0 <= out.logs["teacher_entropy"] <= 1.0 and 0.0 <= out.logs["teacher_marginal_entropy"] <= 1.0
    assert out.logs["teacher_temp"] == pytest.approx(0.04) and math.isfinite(out.logs["kl"])


@pytest.mark.parametrize("backbone", ["vit_tiny_p4", "cvt_tiny_s4"])
def test_koleo_adds_its_weighted_term_over_the_global_crops(backbone):
    batch = _batch()
    plain = _dino(backbone).train()(batch)
    assert "loss_koleo" not in plain.logs
    weight = 0.3
    dino = _dino(backbone, koleo_weight=weight).train()
    out = dino(batch)
    koleo = out.logs["loss_koleo"]
    # the same DINO loss, plus exactly weight x the logged term
    assert torch.equal(out.loss, plain.loss + weight * torch.tensor(koleo))
    assert {k: v for k, v in out.logs.items() if k != "loss_koleo"} == plain.logs
    # the term: one KoLeo per global crop, over the student's pooled features, summed (local crops left out)
    with torch.no_grad():  # the global crops in one pass, as the student sees them (the CvT's BatchNorm)
        feats = dino._features(dino.encoder, torch.cat(batch.views[:2]))
        want = sum(float(koleo_loss(f)) for f in feats.chunk(2))
    assert koleo == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in dino.encoder.parameters() if p.grad is not None)


def test_config_checks():
    with pytest.raises(ConfigError, match=r"method\.koleo_weight must be >= 0"):
        load_config(None, ["method.name=dino", "method.koleo_weight=-0.1"])
    with pytest.raises(ConfigError, match="method.global_views"):
        load_config(None, ["method.name=dino", "method.views=[{count: 2}]"])
    with pytest.raises(ConfigError, match="global views .* of one size"):
        load_config(None, ["method.name=dino", "method.views=[{}, {size: 12}, {size: 12}]"])
    with pytest.raises(ValueError, match="needs 2 global views and at least one more"):
        _dino()(Batch(torch.randn(2, 1, 28, 28)))


@pytest.mark.fmnist
@pytest.mark.slow
def test_a_dino_run_is_evaluated_and_fine_tuned_through_its_teacher(tmp_path, tiny_run_overrides):
    from safetensors.torch import load_file

    from mimkit.engine import pretrain
    from mimkit.engine.checkpoint import latest_checkpoint
    from mimkit.engine.distributed import DistInfo
    from mimkit.engine.trainer import Trainer
    from mimkit.evaluation.finetune import finetune_config
    from mimkit.evaluation.runner import resolve_subject

    run = tmp_path / "dino"
    small = [f"method.{k}={v}" for k, v in SMALL.items() if k not in ("name", "views")]
    overrides = [o for o in tiny_run_overrides if not o.startswith("method.")]
    pretrain(load_config(None, [f"run_dir={run}", *overrides, "method.name=dino", *small,
                                "method.views=[{count: 2}, {size: 12, scale: [0.1, 0.4], count: 2}]",
                                "train.epochs=1"]))
    ckpt = latest_checkpoint(run / "checkpoints")
    weights = load_file(str(ckpt / "model.safetensors"))
    teacher = {k[len("teacher_encoder."):]: v for k, v in weights.items() if k.startswith("teacher_encoder.")}
    student = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert teacher.keys() == student.keys() and any(not torch.equal(teacher[k], student[k]) for k in teacher)
    subject = resolve_subject(str(run), None, None, [])
    assert all(torch.equal(subject.encoder.state_dict()[k], v) for k, v in teacher.items())
    tuned = Trainer(finetune_config(str(run), overrides=["data.subset_fraction=0.01", "train.progress=false"]),
                    DistInfo())
    assert all(torch.equal(tuned.method.encoder.state_dict()[k], v) for k, v in teacher.items())
