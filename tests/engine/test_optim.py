from __future__ import annotations

import math

import pytest
import torch

from mimkit.config import OptimConfig
from mimkit.engine.optim import build_optimizer, cosine_lr, scaled_lr


def test_cosine_lr_warmup():
    peak = 1.0
    assert cosine_lr(0, 100, 10, peak) == pytest.approx(0.1)
    assert cosine_lr(4, 100, 10, peak) == pytest.approx(0.5)
    assert cosine_lr(9, 100, 10, peak) == pytest.approx(1.0)
    values = [cosine_lr(s, 100, 10, peak) for s in range(10)]
    assert values == sorted(values)


def test_cosine_lr_decay():
    peak, floor = 2.0, 0.2
    assert cosine_lr(10, 110, 10, peak, floor) == pytest.approx(peak)
    assert cosine_lr(60, 110, 10, peak, floor) == pytest.approx((peak + floor) / 2)
    quarter = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    assert cosine_lr(35, 110, 10, peak, floor) == pytest.approx(quarter)
    assert cosine_lr(110, 110, 10, peak, floor) == pytest.approx(floor)
    assert cosine_lr(500, 110, 10, peak, floor) == pytest.approx(floor)  # clamped after the end
    decay = [cosine_lr(s, 110, 10, peak, floor) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)


def test_cosine_lr_without_warmup():
    assert cosine_lr(0, 10, 0, 1.0) == pytest.approx(1.0)
    assert cosine_lr(5, 10, 0, 1.0) == pytest.approx(0.5)


def test_scaled_lr():
    cfg = OptimConfig(base_lr=1e-3, batch_size=64, accum_steps=2)
    assert scaled_lr(cfg) == pytest.approx(1e-3 * 128 / 256)
    assert scaled_lr(cfg, world_size=4) == pytest.approx(1e-3 * 512 / 256)
    assert scaled_lr(OptimConfig(base_lr=1.5e-4, batch_size=256)) == pytest.approx(1.5e-4)


def test_build_optimizer_weight_decay_groups(tiny_mae):
    opt = build_optimizer(tiny_mae, OptimConfig(weight_decay=0.05, betas=[0.8, 0.9]), lr=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in tiny_mae.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay and no_decay and not decay & no_decay
    assert decay | no_decay == set(names.values())  # every parameter is optimised once
    for g in opt.param_groups:
        assert g["lr"] == 0.01 and g["betas"] == (0.8, 0.9)
        if g["weight_decay"] > 0:
            assert g["weight_decay"] == 0.05
    params = dict(tiny_mae.named_parameters())
    for name in no_decay:
        assert params[name].ndim <= 1 or name.endswith(".bias") or name == "encoder.cls_token", name
    for name, p in params.items():
        if p.ndim <= 1 or name.endswith(".bias"):
            assert name in no_decay, name
    assert "encoder.cls_token" in no_decay  # the encoder's no_weight_decay() is honoured
    assert "encoder.patch_embed.proj.weight" in decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay
    assert "decoder.pred.weight" in decay


def test_group_lr_scale_and_weight_decay_schedule():
    """A group's lr_scale multiplies the scheduled lr (0 freezes it), and a weight_decay_end moves
    its decay on a cosine from the start value to the end value."""
    import torch

    from mimkit.engine.optim import apply_schedules

    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.5, "weight_decay": 0.04, "weight_decay_end": 0.4,
                              "weight_decay_start": 0.04},
                             {"params": [b], "lr_scale": 0.0, "weight_decay": 0.05, "weight_decay_start": 0.05}])
    apply_schedules(opt, 1e-3, 0.0)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 0.0]
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.04)
    apply_schedules(opt, 1e-3, 0.5)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.22)
    apply_schedules(opt, 1e-3, 1.0)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.4)
    assert opt.param_groups[1]["weight_decay"] == 0.05
    b.grad = torch.ones_like(b)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2, 2)), "lr_scale 0 must leave the group unchanged"


def test_a_schedule_fitted_to_fewer_steps_cuts_its_warmup_and_never_lengthens_it():
    from mimkit.engine.optim import Schedule, cosine_lr

    plan = Schedule(total_steps=100, warmup=40, peak_lr=1e-3, min_lr=0.0, max_steps=100)
    assert plan.lr(10) == cosine_lr(10, 100, 40, 1e-3, 0.0)
    short = plan.fitted(60)
    assert (short.total_steps, short.warmup, short.max_steps) == (60, 15, 100)
    assert short.fitted(100).warmup == 15, "a warmup once cut stays cut, or the lr would dip back"
    assert plan.total_steps == 100, "a schedule is a value: fitting returns a new one"
    assert plan.fitted(500).total_steps == 100, "never longer than train.epochs gives"
