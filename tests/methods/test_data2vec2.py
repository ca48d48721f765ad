"""data2vec 2.0: clones and their masks, one teacher pass, the conv decoder, targets and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fixed_batch_losses

from mimkit.backbones import create_backbone
from mimkit.errors import ConfigError
from mimkit.masking import TokenMask
from mimkit.methods import check_method_cfg, create_method
from mimkit.methods.data2vec2 import ConvDecoder, Data2Vec2, instance_normed_targets


def _d2v2(**cfg) -> Data2Vec2:
    torch.manual_seed(0)
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=4, num_heads=2)
    return create_method({"name": "data2vec2", "decoder_dim": 16, **cfg}, enc)


def test_targets_instance_norm_each_block_over_its_tokens_then_layer_norm_the_average():
    blocks = [torch.randn(2, 6, 4) * s + s for s in (1.0, 5.0)]

    def inorm(b):  # per image and channel, over the tokens
        return (b - b.mean(1, keepdim=True)) / torch.sqrt(b.var(1, unbiased=False, keepdim=True) + 1e-5)

    want = F.layer_norm((inorm(blocks[0]) + inorm(blocks[1])) / 2, (4,))
    torch.testing.assert_close(instance_normed_targets(blocks), want, rtol=1e-4, atol=1e-5)


def test_the_decoder_is_local_and_keeps_the_width():
    dec = ConvDecoder(32, 16, depth=2, kernel=3, groups=16)
    x = torch.randn(1, 49, 32)
    y = x.clone()
    y[0, 0] += 10.0  # token (0, 0): its change reaches at most two cells away through two 3 x 3 layers
    a, b = dec(x, (7, 7)), dec(y, (7, 7))
    changed = (a - b).abs().sum(-1)[0].view(7, 7) > 1e-6
    assert changed[0, 0] and changed[2, 2] and not changed[3:, :].any() and not changed[:, 3:].any()
    assert a.shape == (1, 49, 32)
    assert all(c.groups == 16 for c in dec.convs)
    assert ConvDecoder(24, 16, 1, groups=16).convs[0].groups == 8  # cut to what divides both widths


def test_clones_get_their_own_masks_and_share_one_teacher_pass(monkeypatch):
    d2v2 = _d2v2(clones=3).train()
    calls = []
    real = d2v2.teacher_encoder.forward_intermediates
    monkeypatch.setattr(d2v2.teacher_encoder, "forward_intermediates",
                        lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    out = d2v2(torch.randn(5, 1, 28, 28))
    assert calls == [5], "one teacher pass over the images, not over the clones"
    assert out.mask.shape == (5, 49)
    assert out.logs["masked"] == pytest.approx(round(0.8 * 49) / 49)
    out.loss.backward()
    assert all(p.grad is None for p in d2v2.teacher_encoder.parameters())
    assert all(p.grad is not None for p in d2v2.decoder.parameters())


def test_only_hidden_tokens_score_and_the_class_token_regresses_the_mean_target():
    d2v2 = _d2v2(cls_weight=0.0).train()
    images = torch.randn(2, 1, 28, 28)
    torch.manual_seed(1)
    out = d2v2(images)
    assert out.logs["loss_cls"] > 0 and math.isfinite(out.logs["loss_patch"])
    # cls_weight 0 leaves the patch loss alone
    assert float(out.loss.detach()) == pytest.approx(out.logs["loss_patch"], rel=1e-6)
    torch.manual_seed(1)
    weighted = _d2v2(cls_weight=0.5).train()(images)
    want = weighted.logs["loss_patch"] + 0.5 * 4 * weighted.logs["loss_cls"]  # the weight per clone, 4 clones
    assert float(weighted.loss.detach()) == pytest.approx(want, rel=1e-5)


def test_a_grid_smaller_than_a_block_takes_blocks_of_its_side():
    d2v2 = _d2v2(block_size=3)
    out = d2v2(torch.randn(2, 1, 8, 8))  # a 2 x 2 grid
    assert out.mask.shape == (2, 4) and torch.isfinite(out.loss)


@pytest.mark.parametrize("setting, value", [("mask_ratio", 0.0), ("clones", 0), ("decoder_kernel", 2),
                                            ("noise_std", -1.0), ("momentum_end", 2.0), ("top_k", -1)])
def test_bad_settings_are_named(setting, value):
    with pytest.raises(ConfigError, match=rf"method\.{setting}"):
        check_method_cfg({"name": "data2vec2", setting: value})


def test_the_loss_falls_on_a_fixed_batch():
    losses = fixed_batch_losses(_d2v2().train(), torch.randn(8, 1, 28, 28), steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0] and all(math.isfinite(v) for v in losses)


def _d2v2_cvt(**cfg) -> Data2Vec2:
    torch.manual_seed(0)
    enc = create_backbone("cvt_tiny_s2", img_size=28, in_chans=1, dims=(16, 32, 64), num_heads=(1, 2, 2),
                          depths=(1, 1, 1))
    return create_method({"name": "data2vec2", "decoder_dim": 16, "mask_ratio": 0.6, "block_size": 2, **cfg}, enc)


def test_the_cvt_student_sees_nothing_of_its_hidden_cells():
    """On the CvT (no token dropping) a clone's hidden cells lose their pixels: changing them changes
    neither the class-token stand-in nor the decoder's input at the visible cells."""
    d2v2 = _d2v2_cvt().eval()
    assert not d2v2.sparse
    images = torch.randn(2, 1, 28, 28)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, [0, 1, 4, 5, 10, 15]] = True  # 4 x 4 cells of 7 px
    hidden = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
    for cell in (0, 1, 4, 5, 10, 15):
        r, c = divmod(cell, 4)
        hidden[..., 7 * r:7 * r + 7, 7 * c:7 * c + 7] = True
    changed = torch.where(hidden, torch.randn_like(images) * 5, images)
    torch.manual_seed(3)
    cls_a, slots_a = d2v2.encode_clones(images, masks)
    torch.manual_seed(3)
    cls_b, slots_b = d2v2.encode_clones(changed, masks)
    torch.testing.assert_close(cls_a, cls_b)
    torch.testing.assert_close(slots_a[~masks], slots_b[~masks])
    # the class-token stand-in is the mean of the visible output tokens, not of all of them
    tokens = d2v2.encoder.forward_features(images, TokenMask(masks))
    visible_mean = torch.stack([tokens[i][~masks[i]].mean(0) for i in range(2)])
    torch.testing.assert_close(cls_a, visible_mean)
    assert not torch.allclose(cls_a, tokens.mean(1), atol=1e-4)
    # the hidden cells are the noise the decoder fills from, not the encoder's outputs there
    assert slots_a[masks].std() < 0.1 and slots_a[~masks].std() > 0.1


def test_on_the_cvt_the_last_stage_is_the_target_and_every_part_learns(monkeypatch):
    d2v2 = _d2v2_cvt(clones=2).train()
    images = torch.randn(4, 1, 28, 28)
    taken = []
    real = d2v2.teacher_encoder.forward_intermediates
    monkeypatch.setattr(d2v2.teacher_encoder, "forward_intermediates",
                        lambda x, indices, **k: taken.append(indices) or real(x, indices, **k))
    last_stage = real(images, [2], norm=False, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(d2v2.targets(images), instance_normed_targets(last_stage))
    out = d2v2(images)
    assert taken == [1, 1], "one teacher pass, its last stage"
    assert out.mask.shape == (4, 16) and out.logs["masked"] == pytest.approx(10 / 16)
    out.loss.backward()
    for part in (d2v2.encoder, d2v2.decoder):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad)
    assert all(p.grad is None for p in d2v2.teacher_encoder.parameters())
