from __future__ import annotations

import pytest
import torch

from mimkit.backbones import VisionTransformer, create_backbone
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.config import ConfigError
from mimkit.masking import KeepTokens, PixelMask, TokenMask

TINY = dict(img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)


def test_forward_features_shape(tiny_encoder):
    tokens = tiny_encoder.forward_features(torch.randn(3, 1, 28, 28))
    assert tokens.shape == (3, 1 + 49, 32)
    assert torch.isfinite(tokens).all()


def test_keep_idx_drops_tokens(tiny_encoder):
    x = torch.randn(2, 1, 28, 28)
    keep_idx = torch.stack([torch.randperm(49)[:10] for _ in range(2)])
    tokens = tiny_encoder.forward_features(x, KeepTokens(keep_idx))
    assert tokens.shape == (2, 1 + 10, 32)


def test_keep_idx_gathers_after_position_embedding(tiny_encoder):
    """Keeping every token in a permuted order must permute the patch outputs exactly.

    A transformer without position information is permutation-equivariant, so this holds only if
    each kept token carries its own position embedding (gathered after it was added).
    """
    tiny_encoder.eval()
    x = torch.randn(2, 1, 28, 28)
    perm = torch.stack([torch.randperm(49) for _ in range(2)])
    full = tiny_encoder.forward_features(x)
    permuted = tiny_encoder.forward_features(x, KeepTokens(perm))
    expected = torch.gather(full[:, 1:], 1, perm.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(permuted[:, 1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)


def test_other_resolution_recomputes_position_embedding(tiny_encoder):
    x = torch.randn(2, 1, 36, 20)
    tokens = tiny_encoder.forward_features(x)
    assert tokens.shape == (2, 1 + 9 * 5, 32)
    # embed() adds the sin-cos table of the new 9 x 5 grid, spanning the encoder's 7 x 7 positions
    emb = tiny_encoder.embed(x) - tiny_encoder.patch_embed(x)
    torch.testing.assert_close(emb, sincos_2d(9, 5, 32, extent=(7, 7)).expand(2, -1, -1), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(sincos_2d(9, 5, 32), sincos_2d(5, 9, 32))


def test_input_not_divisible_by_patch_raises(tiny_encoder):
    with pytest.raises(ValueError, match="not divisible"):
        tiny_encoder.forward_features(torch.randn(1, 1, 30, 28))


def test_img_size_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible"):
        create_backbone("vit_tiny_p4", **{**TINY, "img_size": 30})


def test_bad_global_pool_raises():
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(**TINY, patch_size=4, global_pool="max")


def test_global_pool_avg_vs_token():
    torch.manual_seed(0)
    avg = create_backbone("vit_tiny_p4", **TINY, global_pool="avg")
    token = create_backbone("vit_tiny_p4", **TINY, global_pool="token")
    token.load_state_dict(avg.state_dict())
    x = torch.randn(2, 1, 28, 28)
    tokens = avg.forward_features(x)
    torch.testing.assert_close(avg.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    torch.testing.assert_close(token.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert not torch.allclose(avg.forward_head(tokens, pre_logits=True), token.forward_head(tokens, pre_logits=True))


def test_classification_head():
    vit = create_backbone("vit_tiny_p4", **TINY, num_classes=7)
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    no_head = create_backbone("vit_tiny_p4", **TINY)
    assert no_head(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_unknown_backbone_setting_refused():
    with pytest.raises(ConfigError, match=r"backbone\.widht.*valid keys:.*embed_dim"):
        create_backbone("vit_tiny_p4", widht=3)


def test_sincos_needs_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 30)


def test_sincos_shape_and_rows_differ():
    pe = sincos_2d(4, 6, 16)
    assert pe.shape == (1, 24, 16) and pe.dtype == torch.float32
    assert torch.unique(pe[0], dim=0).shape[0] == 24  # every position has its own embedding


def test_forward_intermediates_follows_timm():
    """Blocks are counted; the class token is left out of the intermediates unless asked for."""
    torch.manual_seed(0)
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        final, maps = enc.forward_intermediates(x, 2)
        assert torch.equal(final, enc.forward_features(x)) and final.shape == (2, 1 + 49, 32)
        assert [tuple(m.shape) for m in maps] == [(2, 32, 7, 7)] * 2
        tokens = enc.forward_intermediates(x, [1, 2], output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in tokens] == [(2, 49, 32)] * 2
        torch.testing.assert_close(maps[0].flatten(2).transpose(1, 2), tokens[0], rtol=0, atol=0)
        pairs = enc.forward_intermediates(x, [-1], return_prefix_tokens=True, norm=True, intermediates_only=True)
        (patch_map, cls), = pairs
        assert patch_map.shape == (2, 32, 7, 7) and cls.shape == (2, 1, 32)
        torch.testing.assert_close(cls, final[:, :1], rtol=0, atol=0)
        torch.testing.assert_close(patch_map.flatten(2).transpose(1, 2), final[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[1, 3\] \(the last n of the 3 blocks\)"):
        enc.forward_intermediates(x, 4)


def test_forward_last_blocks_ends_with_forward_features():
    torch.manual_seed(0)
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        outs = enc.forward_last_blocks(x, 2)
        assert len(outs) == 2 and all(o.shape == (2, 50, 32) for o in outs)
        torch.testing.assert_close(outs[-1], enc.forward_features(x), rtol=0, atol=0)
        assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(ValueError, match=r"indices must be in \[1, 3\] \(the depth\)"):
        enc.forward_last_blocks(x, 0)


def test_token_mask_replaces_masked_patch_embeddings(tiny_encoder):
    """The mask-token path (BEiT, iBOT): masked patches carry the token plus their own position."""
    tiny_encoder.eval()
    x = torch.randn(2, 1, 28, 28)
    token = torch.randn(32)
    none = TokenMask(torch.zeros(2, 49, dtype=torch.bool), token)
    torch.testing.assert_close(tiny_encoder.forward_features(x, none), tiny_encoder.forward_features(x))
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :21] = True  # patch rows 0-2
    embedded = tiny_encoder.embed(x, TokenMask(mask, token))
    pos = tiny_encoder.embed(torch.zeros_like(x)) - tiny_encoder.patch_embed(torch.zeros_like(x))
    torch.testing.assert_close(embedded[:, :21], (token + pos[:, :21]).expand(2, -1, -1))
    torch.testing.assert_close(embedded[:, 21:], tiny_encoder.embed(x)[:, 21:])
    # what is under the mask no longer reaches the output
    y = x.clone()
    y[..., :12, :] = torch.randn_like(y[..., :12, :])  # pixel rows 0-11: patch rows 0-2 only
    torch.testing.assert_close(tiny_encoder.forward_features(x, TokenMask(mask, token)),
                               tiny_encoder.forward_features(y, TokenMask(mask, token)))
    with pytest.raises(ValueError, match=r"mask \[N, 49\]"):
        tiny_encoder.forward_features(x, TokenMask(mask[:, :10], token))


def test_a_mask_kind_the_backbone_does_not_take_is_refused(tiny_encoder):
    with pytest.raises(TypeError, match="takes masks of kind groups, keep_idx, token_mask, got PixelMask"):
        tiny_encoder.forward_features(torch.randn(1, 1, 28, 28), PixelMask(torch.ones(1, 1, 28, 28)))


def test_a_smaller_input_spans_the_positions_of_the_whole_image():
    """DINO's local crops: a 12 px crop of a 28 px encoder is placed over the whole 7 x 7 position grid
    (as DINO interpolates its position embedding), not in its top-left 3 x 3 corner."""
    full = sincos_2d(7, 7, 32)[0].view(7, 7, 32)
    small = sincos_2d(3, 3, 32, extent=(7, 7))[0].view(3, 3, 32)
    corner = sincos_2d(3, 3, 32)[0].view(3, 3, 32)
    torch.testing.assert_close(small[1, 1], full[3, 3])  # the centre cell at the centre position
    assert not torch.allclose(small, corner)
    torch.testing.assert_close(sincos_2d(7, 7, 32, extent=(7, 7)), sincos_2d(7, 7, 32), rtol=0, atol=0)
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    x = torch.randn(1, 1, 12, 12)
    tokens = enc.patch_embed(x)
    torch.testing.assert_close(enc.embed(x), tokens + small.reshape(1, 9, 32))
