"""Every registered backbone and method, built small, honours its interface.

The parameter lists are read from the registries, so a new entry is covered without editing this
file.
"""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_BACKBONE_PAIRS, TINY_FAMILY, family, method_batch
from conftest import preset as _preset
from conftest import tiny_backbone_kwargs as _tiny_backbone_kwargs
from conftest import tiny_method_cfg as _tiny_method_cfg

from mimkit.backbones import BACKBONES, backbones_taking, create_backbone
from mimkit.config import ConfigError
from mimkit.methods import METHODS, PretrainMethod, PretrainOutput, check_method_cfg, create_method


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


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_preset_is_used(name):
    """The registry entry's preset reaches the module unless overridden."""
    preset = _preset(name)
    kwargs, _ = _tiny_backbone_kwargs(name)
    enc = create_backbone(name, **kwargs)
    if "patch_size" in preset:
        assert enc.patch_size == preset["patch_size"]


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
    method = create_method(_tiny_method_cfg(name, img), enc)
    assert method.encoder is enc
    n = 3 * method.batch_multiple  # a method mixing images in sets gets whole sets, three of them
    images = torch.randn(n, 1, img, img)
    out = method(method_batch(method, images, torch.arange(n) % 3))
    assert isinstance(out, PretrainOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"encoder parameters without gradient: {missing}"
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if out.mask is not None:
        assert out.mask.shape[0] == n
        assert set(torch.unique(out.mask).tolist()) <= {0.0, 1.0}
    method.after_step(0, 10)  # the hook exists for every method
    if type(method).reconstruct is PretrainMethod.reconstruct:
        return  # a method that reconstructs nothing (the classifier)
    recon, pixel_mask = method.reconstruct(images, out)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert pixel_mask.shape == (n, 1, img, img)
    assert set(torch.unique(pixel_mask).tolist()) <= {0.0, 1.0}
    assert 0 < float(pixel_mask.mean()) < 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_refuses_an_incompatible_backbone(name):
    other = [b for b in BACKBONES if b not in backbones_taking(METHODS[name].mask_kind)]
    if not other:
        pytest.skip("every backbone fits this method")
    enc = create_backbone(other[0], img_size=16, in_chans=1, **TINY_FAMILY[family(other[0])])
    with pytest.raises(ConfigError, match="Valid backbones"):
        create_method(_tiny_method_cfg(name), enc)


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_method_contract_v2(name, backbone):
    """The engine's view of every method: a Batch in, param groups covering each parameter once,
    an eval module with the backbone interface, and one engine step that changes the weights."""
    from mimkit.config import OptimConfig
    from mimkit.engine.optim import build_optimizer
    from mimkit.engine.step import train_step

    torch.manual_seed(0)
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    method = create_method(_tiny_method_cfg(name, img), create_backbone(backbone, **kwargs))
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

    optimizer = build_optimizer(method, OptimConfig(), 1e-3)
    before = [p.detach().clone() for p in method.parameters()]
    result = train_step(method, method, [batch], optimizer, device=torch.device("cpu"), precision="fp32",
                        lr=1e-3, step=0, total_steps=10)
    assert result.taken and result.images == 4 and torch.isfinite(result.grad_norm)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters(), strict=True))
    assert all(p.grad is None for p in method.parameters())


@pytest.mark.parametrize("name, backbone", METHOD_BACKBONE_PAIRS)
def test_every_method_builds_on_the_meta_device(name, backbone):
    """Settings read from a file are checked against the weights on a meta-device build (nothing allocated)
    before the real one; that check is only as good as the meta build, so each pair must have one."""
    kwargs, img = _tiny_backbone_kwargs(backbone, in_chans=1)
    with torch.device("meta"):
        skeleton = create_method(_tiny_method_cfg(name, img), create_backbone(backbone, **kwargs))
    real = create_method(_tiny_method_cfg(name, img), create_backbone(backbone, **kwargs))
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
