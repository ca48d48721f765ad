"""MixedAE: the homologous contrast, one sequence per group, the mixed encoder never sees hidden patches."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mimkit.backbones import create_backbone
from mimkit.errors import ConfigError
from mimkit.methods import create_method
from mimkit.methods.mixedae import MixedAE, _warn_segment_shortcut, homologous_contrastive_loss

SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "projector_dim": 16}
NAIVE = {"seg_embed": False, "homologous_attention": False, "contrastive_weight": 0.0}


def _mixedae(**cfg) -> MixedAE:
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=32, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return create_method({"name": "mixedae", **SMALL, **cfg}, vit)


def test_contrastive_loss_rewards_grouping_tokens_by_image():
    source = torch.arange(4).repeat_interleave(4).unsqueeze(0)  # [1, 16]
    grouped = F.normalize(F.one_hot(source, 4).float() + 0.01 * torch.randn(1, 16, 4), dim=-1)
    mixed = F.normalize(torch.randn(1, 16, 4), dim=-1)
    assert homologous_contrastive_loss(grouped, source, 0.1) < homologous_contrastive_loss(mixed, source, 0.1)


def test_contrastive_loss_matches_the_formula_on_a_small_case():
    z = F.normalize(torch.randn(1, 4, 3), dim=-1)
    source = torch.tensor([[0, 0, 1, 1]])
    sim = (z[0] @ z[0].T) / 0.5
    expected = 0.0
    for p in range(4):
        denominator = torch.logsumexp(torch.cat([sim[p, :p], sim[p, p + 1:]]), 0)
        q = p + 1 if p % 2 == 0 else p - 1  # the one positive
        expected += -(sim[p, q] - denominator) / 4
    torch.testing.assert_close(homologous_contrastive_loss(z, source, 0.5), expected)


def test_shapes_and_logs():
    method = _mixedae()
    out = method(torch.randn(8, 1, 32, 32))
    assert out.pred.shape == (8, 64, 16) and (out.mask.sum(1) == 48).all()
    assert {"loss_rec", "loss_homologous", "homologous_recognition/0", "homologous_recognition/1"} <= set(out.logs)
    assert 0 <= float(out.logs["homologous_recognition/0"]) <= 1
    naive = _mixedae(**NAIVE)
    logs = naive(torch.randn(8, 1, 32, 32)).logs
    assert naive.seg_embed is None and naive.projector is None
    assert not any(k.startswith("homologous") or k == "loss_homologous" for k in logs)


def test_warns_once_that_the_segment_embedding_gives_the_contrastive_loss_away(caplog):
    _warn_segment_shortcut.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.mixedae"):
        _mixedae(seg_embed=False)
        _mixedae(contrastive_weight=0.0)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="mimkit.methods.mixedae"):
        _mixedae()
        _mixedae()  # a second model in the same process (visualize, export) says nothing new
    assert "segment embedding" in caplog.text and "method.seg_embed=false" in caplog.text
    assert "mixedae_noseg_fmnist" in caplog.text and len(caplog.records) == 1


def test_the_encoder_processes_one_sequence_per_group():
    method = _mixedae()
    from mimkit.masking import group_assignment

    mix = group_assignment(8, 4, 64)
    latent, _ = method.encode_mixed(torch.randn(8, 1, 32, 32), mix)
    assert latent.shape == (2, 1 + 64, 32)  # as many tokens as MAE at mask ratio 0.75


def test_hidden_patches_never_reach_the_network():
    """Changing image 0 where it is hidden changes its loss target, not a single prediction."""
    method = _mixedae().eval()
    x = torch.randn(8, 1, 32, 32)
    torch.manual_seed(3)
    with torch.no_grad():
        base = method(x)
    hidden = base.mask[0].view(8, 8).bool().repeat_interleave(4, 0).repeat_interleave(4, 1)
    y = x.clone()
    y[0, 0][hidden] = torch.randn(int(hidden.sum()))
    torch.manual_seed(3)
    with torch.no_grad():
        out = method(y)
    assert torch.equal(out.pred, base.pred)
    assert out.logs["loss_rec"] != base.logs["loss_rec"]
    z = x.clone()
    z[0, 0][~hidden] = 0.0  # and its visible patches do reach it (the check can fail)
    torch.manual_seed(3)
    with torch.no_grad():
        assert not torch.equal(method(z).pred, base.pred)


def test_homologous_blocks_limits_topk_to_the_last_blocks():
    logs = _mixedae(homologous_blocks=1)(torch.randn(4, 1, 32, 32)).logs
    assert "homologous_recognition/1" in logs and "homologous_recognition/0" not in logs


def test_settings_and_batches_are_checked():
    for bad, match in (({"mix_ratio": 0.3}, "1/G"), ({"mix_ratio": 0.75}, "1/G"),
                       ({"contrastive_temperature": 0.0}, "temperature"), ({"homologous_blocks": -1}, "homologous")):
        with pytest.raises(ConfigError, match=match):
            _mixedae(**bad)
    method = _mixedae(mix_ratio=0.5)
    assert method.batch_multiple == 2
    with pytest.raises(ValueError, match="multiple of the group size"):
        method(torch.randn(3, 1, 32, 32))
    with pytest.raises(ConfigError, match="multiple of 4"):
        _mixedae().check_image_size(28, 28)  # 49 tokens do not split four ways


def test_bf16_autocast_gives_a_finite_loss_and_float32_masks():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _mixedae()(torch.randn(4, 1, 32, 32))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.mask.dtype == torch.float32  # masks stay float32 under autocast
