"""The Swin backbone: stage shapes, windows, the attention restriction and the published sizes."""

from __future__ import annotations

import pytest
import torch

from mimkit.backbones import SwinTransformer, check_backbone_input, create_backbone
from mimkit.backbones.swin import SwinBlock, window_attention_mask
from mimkit.errors import ConfigError
from mimkit.masking import KeepTokens

TINY = dict(in_chans=1, embed_dims=(16, 32), depths=(2, 2), num_heads=(1, 2))


def test_small_preset_maps_at_28px():
    torch.manual_seed(0)
    enc = create_backbone("swin_tiny_p2", **TINY).eval()
    maps = enc.forward_stages(torch.randn(2, 1, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 14, 14, 16), (2, 7, 7, 32)]
    assert enc.windows == [7, 7] and enc.grid_size(28, 28) == (7, 7)
    assert enc.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 49, 32)


def test_swin_t_has_the_published_size():
    """Swin-T without its 1000-class head: about 27.5M parameters (the paper's 28M includes it)."""
    enc = create_backbone("swin_t")
    params = sum(p.numel() for p in enc.parameters())
    assert 27.0e6 < params < 28.0e6, params
    with torch.no_grad():
        assert enc.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 49, 768)


def test_a_map_no_larger_than_its_window_attends_globally():
    enc = SwinTransformer(img_size=32, patch_size=2, in_chans=1, embed_dims=(16, 32, 64), depths=(1, 1, 1),
                          num_heads=(1, 2, 2), window_size=8)
    assert enc.windows == [8, 8, 4]


def test_sizes_the_patch_does_not_divide_are_refused():
    with pytest.raises(ConfigError, match="not divisible by backbone.patch_size 2"):
        check_backbone_input({"name": "swin_tiny_p2"}, 27)
    with pytest.raises(ConfigError, match="backbone.img_size 27"):
        create_backbone("swin_tiny_p2", img_size=27)
    with pytest.raises(ConfigError, match="one entry per stage"):
        create_backbone("swin_tiny_p2", embed_dims=(16, 32, 64))


def test_maps_that_are_not_whole_windows_are_padded_and_the_padding_is_not_attended():
    """A 12 px crop gives a 6x6 map under a 7x7 window: padded, and its padding invisible."""
    torch.manual_seed(0)
    enc = create_backbone("swin_tiny_p2", **TINY).eval()
    with torch.no_grad():
        tokens = enc.forward_features(torch.randn(2, 1, 12, 12))
    assert tokens.shape == (2, 9, 32) and torch.isfinite(tokens).all() and enc.grid_size(12, 12) == (3, 3)
    block = SwinBlock(8, 2, window=4, shift=0, mlp_ratio=2.0, drop_path=0.0).eval()
    x = torch.randn(1, 3, 3, 8)
    with torch.no_grad():  # the 3x3 map alone equals its top-left corner inside a 4x4 map of other tokens
        big = torch.randn(1, 4, 4, 8)
        big[:, :3, :3] = x
        labels = torch.zeros(1, 4, 4, dtype=torch.long)
        labels[:, 3, :], labels[:, :, 3] = 1, 1
        torch.testing.assert_close(block(x), block(big, labels)[:, :3, :3], atol=1e-6, rtol=1e-6)


def test_a_window_mask_lets_tokens_see_only_equal_ids():
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0], [2, 2, 0, 0], [0, 0, 0, 0]]).unsqueeze(0)
    mask = window_attention_mask(ids, 2)  # four 2x2 windows
    assert mask.shape == (4, 4, 4) and mask.dtype == torch.float32
    first = ids[0, :2, :2].flatten()
    allowed = first.unsqueeze(1) == first.unsqueeze(0)
    assert torch.equal(mask[0] == 0, allowed) and (mask[0][~allowed] == torch.finfo(torch.float32).min).all()
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()  # every token sees itself: no empty row


@pytest.mark.parametrize("shift", [0, 2])
def test_a_block_with_labels_keeps_the_two_images_apart(shift):
    """Changing the tokens of label 1 leaves the outputs at label 0 unchanged, shifted windows too;
    without the labels the same change reaches them (the check can fail)."""
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window=4, shift=shift, mlp_ratio=2.0, drop_path=0.0).eval()
    labels = torch.randint(0, 2, (1, 8, 8))
    x = torch.randn(2, 8, 8, 8)
    y = x.clone()
    y[(labels == 1).expand(2, -1, -1)] = torch.randn(int((labels == 1).sum()) * 2, 8)
    own = (labels == 0).expand(2, -1, -1)
    with torch.no_grad():
        assert torch.equal(block(x, labels)[own], block(y, labels)[own])
        assert not torch.allclose(block(x)[own], block(y)[own])


def test_per_sample_labels_are_honoured():
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window=4, shift=0, mlp_ratio=2.0, drop_path=0.0).eval()
    labels = torch.randint(0, 2, (3, 4, 4))
    x = torch.randn(3, 4, 4, 8)
    y = torch.where((labels == 1).unsqueeze(-1), torch.randn_like(x), x)
    with torch.no_grad():
        assert torch.equal(block(x, labels)[labels == 0], block(y, labels)[labels == 0])


def test_the_swin_refuses_masks_it_cannot_take():
    enc = create_backbone("swin_tiny_p2", **TINY)
    with pytest.raises(TypeError, match="mix"):
        enc.forward_features(torch.randn(1, 1, 28, 28), KeepTokens(torch.zeros(1, 4, dtype=torch.long)))


def test_relative_position_tables_are_exempt_from_weight_decay():
    enc = create_backbone("swin_tiny_p2", **TINY)
    names = enc.no_weight_decay()
    assert len(names) == 4 and all(n.endswith("relative_position_bias_table") for n in names)


def test_forward_intermediates_are_the_stages():
    torch.manual_seed(0)
    enc = create_backbone("swin_tiny_p2", **TINY).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        final, maps = enc.forward_intermediates(x)
        assert torch.equal(final, enc.forward_features(x))
        assert [tuple(m.shape) for m in maps] == [(2, 16, 14, 14), (2, 32, 7, 7)]
        stages = enc.forward_stages(x)  # [N, H, W, D]
        torch.testing.assert_close(maps[0], stages[0].permute(0, 3, 1, 2), rtol=0, atol=0)
        (last,) = enc.forward_intermediates(x, 1, norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(last, final, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[1, 2\] \(the last n of the 2 stages\)"):
        enc.forward_intermediates(x, 3)


def test_forward_last_blocks_end_with_the_features():
    torch.manual_seed(0)
    enc = create_backbone("swin_tiny_p2", **TINY).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        outs = enc.forward_last_blocks(x, indices=2)
        assert len(outs) == 2 and all(o.shape == (2, 49, 32) for o in outs)
        torch.testing.assert_close(outs[-1], enc.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[1, 2\] \(the last stage's depth\)"):
        enc.forward_last_blocks(x, 3)
