"""Every registered backbone and method, built small, honours its interface.

The parameter lists are read from the registries, so a new entry is covered without editing this
file.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from conftest import METHOD_BACKBONE_PAIRS, TINY_FAMILY, family, method_batch
from conftest import preset as _preset
from conftest import tiny_backbone_kwargs as _tiny_backbone_kwargs
from conftest import tiny_method_cfg as _tiny_method_cfg
from torch import nn

from mimkit.backbones import (
    BACKBONES,
    ConvVisionTransformer,
    VisionTransformer,
    backbones_taking,
    create_backbone,
)
from mimkit.config import ConfigError, OptimConfig
from mimkit.engine.optim import build_optimizer
from mimkit.engine.step import train_step
from mimkit.methods import METHODS, PretrainMethod, PretrainOutput, check_method_cfg, create_method
from mimkit.methods.mae import MAE


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_interface(name):
    torch.manual_seed(0)
    kwargs, img = _tiny_backbone_kwargs(name)
    enc = create_backbone(name, **kwargs)
    x = torch.randn(2, 3, img, img)
    tokens = enc.forward_features(x)
    dim = enc.num_features
    if "embed_dim" in kwargs:
        assert dim == 32
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[-1] == dim
    gh, gw = enc.grid_size(img, img)
    assert tokens.shape[1] == enc.num_prefix_tokens + gh * gw
    pooled = enc.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (2, dim)
    assert torch.isfinite(pooled).all()
    nwd = enc.no_weight_decay()
    assert isinstance(nwd, set)
    param_names = {n for n, _ in enc.named_parameters()}
    assert nwd <= param_names, f"no_weight_decay names unknown parameters: {nwd - param_names}"
    groups = enc.group_matcher()
    assert isinstance(groups, dict) and groups
    assert isinstance(enc.group_matcher(coarse=True), dict)


def _same(a, b) -> bool:
    return (tuple(a) if isinstance(a, list | tuple) else a) == (tuple(b) if isinstance(b, list | tuple) else b)


def _preset_misses(name: str) -> list[str]:
    """Build registered backbone ``name`` with the tiny overrides and say where a setting got lost.

    Every key of the entry's preset, and every override, must reach the class's constructor with the
    preset's value (the override's where one is given), and the module must hold that value wherever it
    keeps an attribute of the same name.
    """
    builder = BACKBONES[name]
    cls = getattr(builder, "func", builder)
    overrides, _ = _tiny_backbone_kwargs(name)
    expected = {**_preset(name), **overrides}
    init, received = cls.__init__, {}

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        received.update(inspect.signature(init).bind(self, *args, **kwargs).arguments)
        init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "__init__", recording_init)
        enc = create_backbone(name, **overrides)
    missing = object()
    misses = [f"{key}: the constructor got {received.get(key, '(nothing)')!r}, expected {value!r}"
              for key, value in expected.items() if not _same(received.get(key, missing), value)]
    for key, value in expected.items():
        held = getattr(enc, key, missing)
        if isinstance(held, int | float | str | tuple | list) and not _same(held, value):
            misses.append(f"{key}: the module holds {held!r}, expected {value!r}")
    return misses


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_preset_is_used(name):
    """The registry entry's preset reaches the module unless overridden (then the override does)."""
    misses = _preset_misses(name)
    assert not misses, f"{name}: {misses}"


class _ForgetfulPartial(functools.partial):
    """A registry entry that builds its class without the preset it declares."""

    def __call__(self, /, *args, **kwargs):
        return self.func(*args, **kwargs)


class _FixedPatchViT(VisionTransformer):
    """A backbone class that takes ``patch_size`` and builds with 16 whatever it was given."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12) -> None:
        super().__init__(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads)


@pytest.mark.parametrize("builder, lost", [
    (_ForgetfulPartial(VisionTransformer, **_preset("vit_tiny_p4")), "patch_size"),
    (_ForgetfulPartial(ConvVisionTransformer, **_preset("cvt_micro_s2")), "kernels"),
    (functools.partial(_FixedPatchViT, **_preset("vit_tiny_p4")), "patch_size"),
], ids=["vit-entry-drops-its-preset", "cvt-entry-drops-its-preset", "class-ignores-a-setting"])
def test_preset_check_names_a_lost_setting(builder, lost, monkeypatch):
    """The preset check fails on an entry whose preset does not reach the module, naming the lost
    settings and only those (the overrides still arrive)."""
    monkeypatch.setitem(BACKBONES, "broken", builder)
    base = next(c.__name__ for c in builder.func.__mro__ if c.__name__ in TINY_FAMILY)
    monkeypatch.setitem(TINY_FAMILY, builder.func.__name__, TINY_FAMILY[base])
    misses = _preset_misses("broken")
    named = {m.split(":")[0] for m in misses}
    assert lost in named, misses
    assert named <= set(_preset("broken")) - set(_tiny_backbone_kwargs("broken")[0]), misses


def test_every_method_has_a_backbone():
    for name, cls in METHODS.items():
        assert backbones_taking(cls.mask_kind), f"no registered backbone takes {name}'s masks"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_defaults_valid(name):
    cfg = check_method_cfg({"name": name})
    assert isinstance(cfg, METHODS[name].Config)


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_method_interface(name, backbone):
    torch.manual_seed(0)
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    enc = create_backbone(backbone, **kwargs)
    method = create_method(_tiny_method_cfg(name, img, backbone), enc)
    assert method.encoder is enc
    n = 3 * method.batch_multiple  # a method mixing images in sets gets whole sets, three of them
    images = torch.randn(n, 1, img, img)
    out = method(method_batch(method, images, torch.arange(n) % 3))
    assert isinstance(out, PretrainOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()  # every parameter's gradient: test_every_trainable_parameter_gets_a_gradient
    assert sum(float(p.grad.abs().sum()) for p in enc.parameters() if p.grad is not None) > 0
    if out.mask is not None:
        assert out.mask.shape[0] == n
        assert set(torch.unique(out.mask).tolist()) <= {0.0, 1.0}
    method.after_step(0, 10)  # the hook exists for every method
    if not method.reconstructs_pixels:
        return  # a method that reconstructs nothing (the classifier)
    recon, pixel_mask = method.reconstruct(images, out)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert pixel_mask.shape == (n, 1, img, img)
    assert set(torch.unique(pixel_mask).tolist()) <= {0.0, 1.0}
    if out.mask is None:  # nothing hidden (a tokenizer's reconstruction of the whole image)
        assert float(pixel_mask.max()) == 0
    else:
        assert 0 < float(pixel_mask.mean()) < 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_refuses_an_incompatible_backbone(name):
    other = [b for b in BACKBONES if b not in backbones_taking(METHODS[name].mask_kind)]
    if not other:
        pytest.skip("every backbone fits this method")
    enc = create_backbone(other[0], img_size=16, in_chans=1, **TINY_FAMILY[family(other[0])])
    with pytest.raises(ConfigError, match="Valid backbones"):
        create_method(_tiny_method_cfg(name), enc)


def _tiny_method(name: str, backbone: str) -> tuple[PretrainMethod, int]:
    """Method ``name`` built small around a tiny ``backbone`` for grey images (seed 0), and the image side."""
    torch.manual_seed(0)
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    return create_method(_tiny_method_cfg(name, img, backbone), create_backbone(backbone, **kwargs)), img


def _gradient_gaps(method: PretrainMethod, img: int) -> tuple[list[str], list[str]]:
    """One forward and backward of a tiny batch (its views, its labels); the trainable parameters left
    without a gradient, and those whose gradient is not finite."""
    n = 2 * method.batch_multiple
    method(method_batch(method, torch.randn(n, 1, img, img), torch.arange(n) % 3)).loss.backward()
    trainable = [(k, p) for k, p in method.named_parameters() if p.requires_grad]
    return ([k for k, p in trainable if p.grad is None],
            [k for k, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()])


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_every_trainable_parameter_gets_a_gradient(name, backbone):
    """A backward reaches every trainable parameter of the method (encoder, decoder, heads, tokens,
    embeddings) with a finite gradient: under DDP one left without a gradient stalls the all-reduce. A
    zero gradient is allowed (DINO's frozen last layer is dropped by the engine, not in backward)."""
    method, img = _tiny_method(name, backbone)
    missing, non_finite = _gradient_gaps(method, img)
    assert not missing, f"{name} on {backbone}: trainable parameters without a gradient: {missing}"
    assert not non_finite, f"{name} on {backbone}: non-finite gradients: {non_finite}"


class _MAEWithSpare(MAE):
    """MAE with a parameter its loss never uses."""

    def __init__(self, encoder: nn.Module, cfg: MAE.Config) -> None:
        super().__init__(encoder, cfg)
        self.spare = nn.Parameter(torch.zeros(4))


def _spare_parameter(monkeypatch):
    monkeypatch.setitem(METHODS, "mae_spare", _MAEWithSpare)
    return _tiny_method("mae_spare", "vit_tiny_p4"), ["spare"], []


def _detached_projector(monkeypatch):
    (method, img) = _tiny_method("mixedae", "vit_tiny_p4")
    method.projector.register_forward_hook(lambda module, args, out: out.detach())
    return (method, img), [k for k, _ in method.named_parameters() if k.startswith("projector.")], []


def _nan_decoder_gradient(monkeypatch):
    (method, img) = _tiny_method("mae", "vit_tiny_p4")
    method.decoder.pred.bias.register_hook(lambda grad: grad * float("nan"))
    return (method, img), [], ["decoder.pred.bias"]


@pytest.mark.parametrize("breakage", [_spare_parameter, _detached_projector, _nan_decoder_gradient],
                         ids=["unused-parameter", "detached-head", "nan-gradient"])
def test_gradient_check_names_the_broken_parameters(breakage, monkeypatch):
    """The gradient check fails on a method with a dead or poisoned parameter, naming exactly those;
    the encoder alone would have passed (all its gradients there and finite)."""
    (method, img), dead, poisoned = breakage(monkeypatch)
    missing, non_finite = _gradient_gaps(method, img)
    assert dead or poisoned
    assert (missing, non_finite) == (dead, poisoned)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.encoder.parameters())


def _step_gaps(method: PretrainMethod, batch) -> tuple[list[str], list[str], bool]:
    """One engine step on ``batch``. Returns the trainable parameters that did not change although the
    optimizer got a gradient for them (at a positive lr, or outside every group), those that changed
    although the method kept them out of the step (no gradient at the optimizer), and whether any
    parameter changed at all.

    A gradient counts where AdamW's first step, ``lr * |g| / (|g| + eps)`` per element, is more than
    two float spacings of the weight somewhere. Rounding noise where the gradient is zero in exact
    arithmetic (a key bias under softmax, a normalisation's scale on a one-token map: 1e-18 to 1e-12)
    moves a weight of 1 by less than one spacing, and is left out.
    """
    optimizer = build_optimizer(method, OptimConfig(), 1e-3)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [(k, p) for k, p in method.named_parameters() if p.requires_grad]
    stepped, kept_out = [], []

    def record(opt, args, kwargs):  # what the optimizer is about to apply, after before_optimizer_step
        for k, p in trainable:
            if p.grad is None:
                kept_out.append(k)
                continue
            group = group_of.get(id(p), opt.defaults)  # a parameter outside every group should move too
            g = p.grad.detach().abs()
            first_step = group["lr"] * g / (g + group["eps"])
            if bool((first_step > 4 * torch.finfo(p.dtype).eps * p.detach().abs()).any()):
                stepped.append(k)

    optimizer.register_step_pre_hook(record)
    before = {k: p.detach().clone() for k, p in method.named_parameters()}
    result = train_step(method, method, [batch], optimizer, device=torch.device("cpu"), precision="fp32",
                        lr=1e-3, step=0, total_steps=10)
    assert result.taken and result.images == batch.size and torch.isfinite(result.grad_norm)
    after = dict(method.named_parameters())
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    return ([k for k in stepped if k in unchanged], [k for k in kept_out if k not in unchanged],
            len(unchanged) < len(before))


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_method_contract_v2(name, backbone):
    """The engine's view of every method: a Batch in, param groups covering each parameter once,
    an eval module with the backbone interface, and one engine step that changes every weight it
    has a gradient for (and none the method kept out of the step)."""
    torch.manual_seed(0)
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    method = create_method(_tiny_method_cfg(name, img, backbone), create_backbone(backbone, **kwargs))
    batch = method_batch(method, torch.randn(4, 1, img, img), torch.tensor([0, 1, 2, 0]))
    if METHODS[name].mask_kind is not None and not batch.views:  # a one-view masking method ignores labels
        torch.manual_seed(1)
        with_labels = method(batch).loss
        torch.manual_seed(1)
        assert torch.equal(with_labels, method(batch.images).loss), "a bare tensor and a Batch must agree"

    groups = method.param_groups(0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in method.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable), "param_groups must cover every trainable parameter once"
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.05}

    evaluated = method.eval_module
    assert hasattr(evaluated, "forward_features") and hasattr(evaluated, "forward_head")
    assert evaluated is getattr(method, method.eval_module_name)

    unmoved, moved_without_gradient, _ = _step_gaps(method, batch)
    assert not unmoved, f"{name} on {backbone}: a gradient and no change: {unmoved}"
    assert not moved_without_gradient, f"{name} on {backbone}: kept out of the step, changed: {moved_without_gradient}"
    assert all(p.grad is None for p in method.parameters())


class _MAELeavingOutTheBias(MAE):
    """MAE whose optimizer groups forget the prediction bias."""

    def param_groups(self, weight_decay: float):
        groups = super().param_groups(weight_decay)
        return [{**g, "params": [p for p in g["params"] if p is not self.decoder.pred.bias]} for g in groups]


class _MAEUndoingTheEncoderStep(MAE):
    """MAE whose after-step hook puts the encoder back as it was before the optimizer."""

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        self._kept = {k: v.clone() for k, v in self.encoder.state_dict().items()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.encoder.load_state_dict(self._kept)


class _MAEMovingAFrozenPart(MAE):
    """MAE that keeps its prediction layer out of the step and then moves it anyway."""

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        self.decoder.pred.weight.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        with torch.no_grad():
            self.decoder.pred.weight.mul_(0.5)


@pytest.mark.parametrize("cls, unmoved, moved", [
    (_MAELeavingOutTheBias, ["decoder.pred.bias"], []),
    (_MAEUndoingTheEncoderStep, None, []),
    (_MAEMovingAFrozenPart, [], ["decoder.pred.weight"]),
], ids=["parameter-outside-the-optimizer", "step-undone", "frozen-part-moved"])
def test_step_check_names_the_parameters_the_step_missed(cls, unmoved, moved, monkeypatch):
    """The step check fails where one step leaves a parameter with a gradient as it was, or moves one kept
    out of the step, naming it, although other parameters changed (the check that any weight changed passed)."""
    monkeypatch.setitem(METHODS, "mae_broken", cls)
    method, img = _tiny_method("mae_broken", "vit_tiny_p4")
    got_unmoved, got_moved, any_changed = _step_gaps(method, method_batch(method, torch.randn(2, 1, img, img)))
    assert any_changed
    if unmoved is None:  # every encoder parameter, nothing else
        unmoved = [k for k, p in method.named_parameters() if k.startswith("encoder.") and p.requires_grad]
    assert (got_unmoved, got_moved) == (unmoved, moved)


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_every_method_builds_on_the_meta_device(name, backbone):
    """Settings read from a file are checked against the weights on a meta-device build (nothing allocated)
    before the real one; that check is only as good as the meta build, so each pair must have one."""
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    with torch.device("meta"):
        skeleton = create_method(_tiny_method_cfg(name, img, backbone), create_backbone(backbone, **kwargs))
    real = create_method(_tiny_method_cfg(name, img, backbone), create_backbone(backbone, **kwargs))
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
