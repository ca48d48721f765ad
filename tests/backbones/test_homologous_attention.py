"""Homologous attention: exactly K keys per query, vanilla attention when K is every key, recognition."""

from __future__ import annotations

import pytest
import torch

from mimkit.backbones import create_backbone
from mimkit.backbones.layers.homologous_attention import homologous_attention, topk_attention_mask
from mimkit.masking import MixGroups, group_assignment


def test_topk_keeps_exactly_k_per_row_even_on_ties():
    logits = torch.zeros(2, 3, 5, 9)  # every logit tied
    logits[0, 0, 0, :4] = 1.0  # and a row with four tied maxima, k = 3 of them
    for k in (1, 3, 9):
        keep = topk_attention_mask(logits, k)
        assert (keep.sum(-1) == k).all()
    keep = topk_attention_mask(logits, 3)
    assert keep[0, 0, 0, :4].sum() == 3 and not keep[0, 0, 0, 4:].any()


def test_homologous_attention_with_every_key_is_timm_attention():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ours, _ = homologous_attention(attn, x, k=17)
        torch.testing.assert_close(ours, attn(x), atol=1e-5, rtol=1e-5)
        fewer, _ = homologous_attention(attn, x, k=4)
    assert not torch.allclose(fewer, ours)


def test_homologous_attention_drops_all_but_the_topk_keys():
    """Changing a key the query did not select leaves the query's output unchanged."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=1).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(1, 17, 3, 1, 32).permute(2, 0, 3, 1, 4)
        logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale
        unselected = int(logits[0, 0, 0].argmin())
        out, _ = homologous_attention(attn, x, k=5)
        # a small change keeps the token query 0's lowest logit, so it stays unselected
        y = x.clone()
        y[0, unselected] = x[0, unselected] * 1.0001
        out2, _ = homologous_attention(attn, y, k=5)
    assert unselected != 0
    torch.testing.assert_close(out[0, 0], out2[0, 0], atol=0, rtol=0)


def test_recognition_is_the_share_of_own_image_keys():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(2, 17, 32)
    source = torch.arange(4).repeat_interleave(4).expand(2, -1)
    with torch.no_grad():
        _, every = homologous_attention(vit.blocks[0].attn, x, k=17, source=source)
    assert float(every) == pytest.approx(4 / 16)  # all keys selected: a quarter are the own image's


def test_the_vit_encodes_one_mixed_sequence_per_group_and_reports_recognition():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2).eval()
    mix = group_assignment(8, 4, 16)
    x = torch.randn(8, 1, 16, 16)
    stats: dict = {}
    with torch.no_grad():
        out = vit.forward_features(x, MixGroups(mix.source, topk_from=1, stats=stats))
        vanilla = vit.forward_features(x, MixGroups(mix.source, topk_from=2))
    assert out.shape == vanilla.shape == (2, 17, 32) and list(stats) == [1]
    assert 0 <= float(stats[1]) <= 1
    assert not torch.allclose(out, vanilla)  # the TopK block attends to fewer keys than the vanilla one


def test_the_vit_keeps_one_image_worth_of_keys_not_one_head_dim(monkeypatch):
    """K = L / G + 1 (the tokens of one image and the class token), whatever the head width; a K tied
    to the head dimension is the public port's bug, so the heads here are 8 wide against L / G = 4."""
    import mimkit.backbones.vit as vit_module

    seen: list[int] = []
    real = vit_module.homologous_block

    def spy(block, tokens, k, source):
        seen.append(k)
        return real(block, tokens, k, source)

    monkeypatch.setattr(vit_module, "homologous_block", spy)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=4).eval()
    with torch.no_grad():
        vit.forward_features(torch.randn(8, 1, 16, 16), MixGroups(group_assignment(8, 4, 16).source))
    assert seen == [16 // 4 + 1] * 2


def test_the_segment_embedding_reaches_the_encoder():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    mix = group_assignment(8, 4, 16)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        plain = vit.forward_features(x, MixGroups(mix.source))
        zero = vit.forward_features(x, MixGroups(mix.source, torch.zeros(4, 32)))
        learned = vit.forward_features(x, MixGroups(mix.source, torch.randn(4, 32)))
    torch.testing.assert_close(zero, plain, atol=0, rtol=0)
    assert not torch.allclose(learned, plain)
