"""data2vec: targets, loss, masking, the teacher's schedule and the collapse guard."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FAMILY, family, fixed_batch_losses

from mimkit.backbones import create_backbone
from mimkit.errors import ConfigError
from mimkit.methods import check_method_cfg, create_method
from mimkit.methods.data2vec import Data2Vec, feature_std, layer_targets, regression_loss
from mimkit.methods.data2vec2 import instance_normed_targets


def _d2v(backbone: str = "vit_tiny_p4", **cfg) -> Data2Vec:
    torch.manual_seed(0)
    kwargs = {**TINY_FAMILY[family(backbone)], "img_size": 28, "in_chans": 1}
    if backbone.startswith("vit"):
        kwargs["depth"] = 4
    return create_method({"name": "data2vec", **cfg}, create_backbone(backbone, **kwargs))


def test_targets_are_the_layer_normed_average_of_layer_normed_blocks():
    blocks = [torch.randn(2, 5, 8) * s + s for s in (1.0, 3.0)]
    want = F.layer_norm((F.layer_norm(blocks[0], (8,)) + F.layer_norm(blocks[1], (8,))) / 2, (8,))
    torch.testing.assert_close(layer_targets(blocks), want)
    assert layer_targets(blocks).dtype == torch.float32


def test_loss_is_smooth_l1_summed_over_features_scaled_by_root_d():
    pred, target = torch.zeros(3, 4), torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [0.0, 0, 0, 0]])
    # beta 2: 0.5 x 1 / 2 = 0.25 for 1, 3 - 1 = 2 for 3; mean over tokens, / sqrt(4)
    assert float(regression_loss(pred, target, 2.0)) == pytest.approx((0.25 + 2.0 + 0.0) / 3 / 2)
    assert float(regression_loss(pred[:0], target[:0], 2.0)) == 0.0


def test_feature_std_is_near_zero_for_a_collapsed_batch():
    assert float(feature_std(torch.ones(10, 4))) == pytest.approx(1e-3, rel=1e-3)
    assert float(feature_std(torch.randn(1000, 4))) == pytest.approx(1.0, abs=0.1)


def test_the_target_is_the_top_half_of_the_vit_and_the_last_stage_of_the_cvt():
    assert _d2v().top_blocks() == 2  # 4 blocks
    assert _d2v(top_k=3).top_blocks() == 3
    assert _d2v(top_k=9).top_blocks() == 4
    assert _d2v("cvt_tiny_s2").top_blocks() == 1
    assert _d2v("cvt_tiny_s2", target_layer="ffn", top_k=9).top_blocks() == 1  # the last stage has 1 block


def _ffn_by_hand(enc: torch.nn.Module, images: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The top ``k`` blocks' feed-forward outputs before the residual, recomputed block by block
    (the ViT's blocks, or the CvT's last stage's), patch tokens only."""
    if hasattr(enc, "blocks"):
        tokens = enc.embed(images)
        tokens = torch.cat([enc.cls_token.expand(len(images), -1, -1), tokens], dim=1)
        blocks, run, prefix = list(enc.blocks), (lambda f, t: f(t)), 1
    else:
        x = images
        for stage in enc.stages[:-1]:
            x, _ = stage(x)
        x, _ = enc.stages[-1].embed(x)
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        blocks, run, prefix = list(enc.stages[-1].blocks), (lambda f, t: f(t, h, w)), 0
    outs = []
    for i, block in enumerate(blocks):
        mid = tokens + run(block.attn, block.norm1(tokens))
        if i >= len(blocks) - k:
            outs.append(block.mlp(block.norm2(mid))[:, prefix:])
        tokens = run(block, tokens)
    return outs


@pytest.mark.parametrize("method", ["data2vec", "data2vec2"])
@pytest.mark.parametrize("backbone", ["vit_tiny_p4", "cvt_tiny_s2"])
def test_ffn_targets_are_the_top_blocks_feed_forward_outputs_before_the_residual(method, backbone):
    torch.manual_seed(0)
    kwargs = {**TINY_FAMILY[family(backbone)], "img_size": 28, "in_chans": 1}
    kwargs |= {"depth": 4} if backbone.startswith("vit") else {"depths": (1, 1, 4)}
    model = create_method({"name": method, "target_layer": "ffn"}, create_backbone(backbone, **kwargs)).eval()
    images = torch.randn(3, 1, 28, 28)
    assert model.top_blocks() == 2  # the top half of 4 blocks (on the CvT, of its last stage)
    by_hand = _ffn_by_hand(model.teacher_encoder, images, 2)
    normed = layer_targets if method == "data2vec" else instance_normed_targets
    with torch.no_grad():
        torch.testing.assert_close(model.targets(images), normed(by_hand))
        assert not any(block.mlp._forward_hooks for block in model.target_blocks())  # removed after the pass
        model.cfg.target_layer = "block"  # the end-of-block targets are something else
        assert not torch.allclose(model.targets(images), normed(by_hand), atol=1e-2)


@pytest.mark.parametrize("backbone", ["vit_tiny_p4", "cvt_tiny_s2"])
def test_only_masked_tokens_are_scored_and_the_teacher_sees_the_whole_image(backbone):
    d2v = _d2v(backbone).train()
    images = torch.randn(4, 1, 28, 28)
    torch.manual_seed(3)
    out = d2v(images)
    grid = d2v.encoder.grid_size(28, 28)
    assert out.mask.shape == (4, grid[0] * grid[1])
    assert 0.4 < float(out.mask.mean()) < 0.8
    # the targets do not depend on the mask: the teacher sees the unmasked image
    torch.manual_seed(4)
    other = d2v.draw_masks(4, *grid)
    assert not torch.equal(other, out.mask.bool())
    torch.testing.assert_close(d2v.targets(images), d2v.targets(images))
    out.loss.backward()
    assert all(p.grad is None for p in d2v.teacher_encoder.parameters())
    if backbone.startswith("vit"):
        assert float(d2v.mask_token.grad.abs().sum()) > 0
    else:
        assert d2v.mask_token is None


def test_decay_rises_linearly_then_stays():
    d2v = _d2v(momentum=0.9, momentum_end=0.99, momentum_anneal=0.5)
    assert d2v.momentum(0.0) == pytest.approx(0.9)
    assert d2v.momentum(0.25) == pytest.approx(0.945)
    assert d2v.momentum(0.75) == 0.99


def test_collapse_is_reported_with_what_to_change(caplog):
    d2v = _d2v(collapse_check_every=1).train()
    d2v(torch.randn(2, 1, 28, 28))
    d2v._stds = (0.01, 0.5)
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.data2vec"):
        d2v.after_step(0, 10)
    assert "targets hardly vary" in caplog.text and "method.top_k" in caplog.text
    caplog.clear()
    d2v._stds = (0.5, 0.001)
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.data2vec"):
        d2v.after_step(1, 10)
    assert "predicts one vector" in caplog.text
    caplog.clear()
    d2v(torch.randn(2, 1, 28, 28))  # a fresh model is neither
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.data2vec"):
        d2v.after_step(2, 10)
    assert "collapse" not in caplog.text


@pytest.mark.parametrize("setting, value", [("mask_ratio", 1.0), ("top_k", -1), ("momentum", 1.5),
                                            ("loss_beta", 0.0), ("mask_min_block", 0), ("target_layer", "fc")])
def test_bad_settings_are_named(setting, value):
    with pytest.raises(ConfigError, match=rf"method\.{setting}"):
        check_method_cfg({"name": "data2vec", setting: value})


def test_the_loss_falls_on_a_fixed_batch():
    losses = fixed_batch_losses(_d2v().train(), torch.randn(8, 1, 28, 28), steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0] and all(math.isfinite(v) for v in losses)
