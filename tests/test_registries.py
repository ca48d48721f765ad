"""Every registered backbone and method, built small, honours its interface.

The parameter lists are read from the registries, so a new entry is covered without editing this
file.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import pytest
import torch

from mimkit.backbones import BACKBONES, create_backbone
from mimkit.methods import METHODS, PretrainOutput, check_method_cfg, create_method

TINY_WIDTH = dict(embed_dim=32, depth=1, num_heads=2)


def _preset(name: str) -> dict:
    builder = BACKBONES[name]
    return dict(builder.keywords) if isinstance(builder, functools.partial) else {}


def _accepted(name: str) -> set[str]:
    builder = BACKBONES[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    return set(inspect.signature(target).parameters)


def _tiny_backbone_kwargs(name: str, in_chans: int = 3) -> tuple[dict, int]:
    """Small settings a builder accepts, and an image size its patch size divides."""
    patch = _preset(name).get("patch_size", 16)
    img = 2 * patch if patch >= 8 else 4 * patch
    wanted = {**TINY_WIDTH, "img_size": img, "in_chans": in_chans}
    return {k: v for k, v in wanted.items() if k in _accepted(name)}, img


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
    if hasattr(enc, "patch_size"):
        assert tokens.shape[1] == enc.num_prefix_tokens + (img // enc.patch_size) ** 2
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


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_preset_is_used(name):
    """The registry entry's preset reaches the module unless overridden."""
    preset = _preset(name)
    kwargs, _ = _tiny_backbone_kwargs(name)
    enc = create_backbone(name, **kwargs)
    if "patch_size" in preset:
        assert enc.patch_size == preset["patch_size"]


def _tiny_method_cfg(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(METHODS[name].Config)}
    small = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
    return {"name": name, **{k: v for k, v in small.items() if k in fields}}


def _tiny_vit() -> torch.nn.Module:
    return create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_defaults_valid(name):
    cfg = check_method_cfg({"name": name})
    assert isinstance(cfg, METHODS[name].Config)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_interface(name):
    torch.manual_seed(0)
    enc = _tiny_vit()
    method = create_method(_tiny_method_cfg(name), enc)
    assert method.encoder is enc
    images = torch.randn(3, 1, 16, 16)
    out = method(images)
    assert isinstance(out, PretrainOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "some encoder parameters got no gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0

    if out.pred is not None:
        assert out.pred.shape[:2] == (3, 16)  # one prediction per patch token of a 4x4 grid
    if out.mask is not None:
        assert out.mask.shape == (3, 16)
        assert set(torch.unique(out.mask).tolist()) <= {0.0, 1.0}
    method.after_step(0)  # the hook exists for every method

    recon, pixel_mask = method.reconstruct(images, out)
    assert recon.shape == images.shape
    assert pixel_mask.shape == (3, 1, 16, 16)
    assert set(torch.unique(pixel_mask).tolist()) <= {0.0, 1.0}
    if out.mask is not None:
        # the pixel mask covers as many patches as the token mask
        assert torch.allclose(pixel_mask.sum(dim=(1, 2, 3)), out.mask.sum(1) * 16)
