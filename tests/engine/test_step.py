"""The training step's gradient clipping: one global norm, or each parameter's norm as DINO clips it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mimkit.data import Batch
from mimkit.engine.step import clip_grad_per_param_, train_step
from mimkit.errors import ConfigError
from mimkit.methods.base import PretrainMethod, PretrainOutput
from mimkit.models import load_config

CLIP = 0.05


class _Tiny(PretrainMethod):
    """A linear map whose weight and bias get large gradients and a ``quiet`` parameter a tiny one."""

    mask_kind = None

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 3)
        self.quiet = nn.Parameter(torch.zeros(2))

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        x = Batch.of(batch).images.flatten(1)
        loss = self.encoder(x).pow(2).mean() + 1e-3 * self.quiet.sum()
        return PretrainOutput(loss, {})


def _images() -> torch.Tensor:
    return 3 * torch.randn(8, 1, 2, 3, generator=torch.Generator().manual_seed(1))


def _unclipped_grads(method: _Tiny) -> dict[str, torch.Tensor]:
    method = copy.deepcopy(method)
    method(_images()).loss.backward()
    return {n: p.grad.clone() for n, p in method.named_parameters()}


def _step_grads(method: _Tiny, **clip) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradients the optimizer is handed (after clipping) and the step's reported norm."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    seen: dict[str, torch.Tensor] = {}
    names = {p: n for n, p in method.named_parameters()}
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update({names[p]: p.grad.clone() for p in opt.param_groups[0]["params"]}))
    result = train_step(method, method, [Batch(_images())], optimizer, device=torch.device("cpu"),
                        precision="fp32", lr=0.1, step=0, total_steps=10, **clip)
    assert result.taken
    return seen, result.grad_norm


def test_per_param_clipping_bounds_each_gradient_and_leaves_small_ones_alone():
    method = _Tiny()
    before = _unclipped_grads(method)
    norms = {n: float(g.norm()) for n, g in before.items()}
    assert norms["encoder.weight"] > CLIP and norms["encoder.bias"] > CLIP and norms["quiet"] < CLIP
    after, grad_norm = _step_grads(method, clip_grad=CLIP, clip_mode="per_param")
    for name, g in before.items():
        if norms[name] > CLIP:
            assert float(after[name].norm()) == pytest.approx(CLIP, rel=1e-4), name
            # DINO's clip_gradients: the gradient times clip / (norm + 1e-6), its direction kept
            torch.testing.assert_close(after[name], g * (CLIP / (g.norm() + 1e-6)))
        else:
            assert torch.equal(after[name], g), name
    # the reported norm is the total norm before clipping, not the clipped one
    total = torch.nn.utils.get_total_norm(list(before.values()))
    torch.testing.assert_close(grad_norm, total)
    assert float(grad_norm) > CLIP * 2


def test_global_clipping_is_unchanged():
    method = _Tiny()
    before = _unclipped_grads(method)
    # the reference: torch's own clip_grad_norm_ on parameters holding the same gradients
    params = [nn.Parameter(torch.zeros_like(g)) for g in before.values()]
    for p, g in zip(params, before.values(), strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, CLIP)
    for mode in ({}, {"clip_mode": "global"}):
        after, grad_norm = _step_grads(copy.deepcopy(method), clip_grad=CLIP, **mode)
        assert all(torch.equal(after[n], p.grad) for n, p in zip(before, params, strict=True))
        assert torch.equal(grad_norm, total)
    # every gradient shrank by the same factor, the small one too
    assert float(after["quiet"].norm()) < float(before["quiet"].norm())


def test_no_clipping_in_either_mode_without_clip_grad():
    method = _Tiny()
    before = _unclipped_grads(method)
    after, grad_norm = _step_grads(method, clip_grad=0.0, clip_mode="per_param")
    assert all(torch.equal(after[n], g) for n, g in before.items())
    torch.testing.assert_close(grad_norm, torch.nn.utils.get_total_norm(list(before.values())))


def test_per_param_norms_are_float32_for_bf16_gradients():
    g = [torch.ones(3, dtype=torch.bfloat16), torch.tensor([3.0, 4.0])]
    total = clip_grad_per_param_(g, 1.0)
    # sqrt(3) is 1.734 in bf16 against 1.7321: a bf16 norm would be off by 1.5e-4 in the total
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, torch.tensor(28.0).sqrt(), rtol=1e-6, atol=0)
    assert g[0].dtype == torch.bfloat16 and float(g[0].float().norm()) == pytest.approx(1.0, rel=1e-2)
    assert float(g[1].norm()) == pytest.approx(1.0, rel=1e-5)


def _fp16_step(method: _Tiny, init_scale: float, **clip) -> tuple[bool, torch.amp.GradScaler]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    result = train_step(method, method, [Batch(_images())], optimizer, device=torch.device("cpu"),
                        precision="fp16", lr=0.1, step=0, total_steps=10, scaler=scaler, **clip)
    return result.taken, scaler


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale():
    method = _Tiny()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    # gradients of about 10 times 2^40 are far beyond fp16's 65504
    taken, scaler = _fp16_step(method, 2.0**40)
    assert not taken and scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, before[n]) for n, p in method.named_parameters())


@pytest.mark.parametrize("clip", [{}, {"clip_grad": CLIP}])
def test_an_fp16_step_applies_the_unscaled_gradient(clip):
    """The update (and the clip) see the gradient divided by the scale: an fp32 step's, to fp16's precision."""
    method, reference = _Tiny(), _Tiny()
    taken, scaler = _fp16_step(method, 2.0**8, **clip)
    assert taken and scaler.get_scale() == 2.0**8
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    train_step(reference, reference, [Batch(_images())], optimizer, device=torch.device("cpu"),
               precision="fp32", lr=0.1, step=0, total_steps=10, **clip)
    for (name, p), q in zip(method.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-3, msg=name)


def test_an_unknown_clip_mode_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.clip_mode must be one of global, per_param, got 'both'"):
        load_config(None, ["optim.clip_mode=both"])
    assert load_config(None, ["optim.clip_mode=per_param"]).optim.clip_mode == "per_param"
    method = _Tiny()
    with pytest.raises(ValueError, match="clip_mode must be one of global, per_param"):
        _step_grads(method, clip_grad=CLIP, clip_mode="both")


@pytest.mark.fmnist
def test_the_trainer_passes_the_configured_clip_mode(tiny_run_config, monkeypatch):
    import mimkit.engine.trainer as trainer_module
    from mimkit.engine.distributed import DistInfo

    seen: dict[str, object] = {}
    real = trainer_module.train_step

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", spy)
    trainer = trainer_module.Trainer(tiny_run_config("optim.clip_grad=1.0", "optim.clip_mode=per_param"), DistInfo())
    trainer.optimizer_step([Batch(torch.randn(32, 1, 28, 28))])
    assert seen["clip_grad"] == 1.0 and seen["clip_mode"] == "per_param"
