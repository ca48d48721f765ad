from __future__ import annotations

import pytest
import torch

from mimkit.backbones import ConvVisionTransformer, create_backbone
from mimkit.backbones.cvt import UPDATE_MASKS
from mimkit.backbones.layers.conv_attention import ConvProjection
from mimkit.backbones.layers.cpu_kernels import bf16_on_cpu
from mimkit.backbones.layers.partial_conv import ConvEmbed, update_ratio, window_count
from mimkit.masking import KeepTokens, PixelMask, TokenMask, pixel_block_mask

TINY = dict(in_chans=1, dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1))


@pytest.fixture
def tiny_cvt() -> ConvVisionTransformer:
    torch.manual_seed(0)
    return create_backbone("cvt_micro_s2", **TINY).eval()


def test_stage_shapes_at_28px(tiny_cvt):
    maps = tiny_cvt.forward_stages(torch.randn(2, 1, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 14, 14), (2, 32, 7, 7), (2, 64, 4, 4)]
    tokens = tiny_cvt.forward_features(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 16, 64)


def test_cvt13_shapes_at_64px_and_size():
    """The published CvT-13 layout: 64x16x16 -> 192x8x8 -> 384x4x4 at 64 px, ~19.6M parameters
    without the 1000-class head (the paper's 20.0M includes it)."""
    enc = create_backbone("cvt_13").eval()
    with torch.no_grad():
        maps = enc.forward_stages(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 16), (192, 8, 8), (384, 4, 4)]
    params = sum(p.numel() for p in enc.parameters())
    assert 19.0e6 < params < 20.0e6, params


def test_runs_at_other_sizes_without_position_embedding(tiny_cvt):
    for size in (20, 28, 33, 64):
        pooled = tiny_cvt(torch.randn(2, 1, size, size))
        assert pooled.shape == (2, 64) and torch.isfinite(pooled).all()


def test_window_count_ignores_padding_and_ratio_is_one_when_all_visible():
    cnt = window_count(torch.ones(1, 1, 6, 6), kernel=3, stride=2, padding=1)
    assert cnt[0, 0, 0, 0] == 4 and cnt[0, 0, 0, 1] == 6 and cnt[0, 0, 1, 1] == 9
    ratio, nxt = update_ratio(torch.ones(2, 1, 6, 6), kernel=3, stride=2, padding=1)
    assert torch.equal(ratio, torch.ones(2, 1, 3, 3)) and torch.equal(nxt, torch.ones(2, 1, 3, 3))


def test_update_ratio_rescales_by_the_visible_share_of_image_pixels():
    m = torch.ones(1, 1, 6, 6)
    m[..., :2, :2] = 0  # the first window (rows/cols 0..1 inside the image) is fully masked
    ratio, nxt = update_ratio(m, kernel=3, stride=2, padding=1)
    assert ratio[0, 0, 0, 0] == 0 and nxt[0, 0, 0, 0] == 0
    assert ratio[0, 0, 0, 1] == pytest.approx(6 / 4)  # window rows 0..1, cols 1..3: 2 of 6 masked
    assert ratio[0, 0, 1, 1] == pytest.approx(9 / 8) and ratio[0, 0, 2, 2] == 1.0


@pytest.mark.parametrize("update_mask", UPDATE_MASKS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_visible_mask_equals_plain_path_exactly(tiny_cvt, precision, update_mask):
    """Nothing masked, nothing changed, border tokens included (zero padding is not a hole)."""
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        plain = tiny_cvt.forward_stages(x)
        masked = tiny_cvt.forward_stages(x, torch.ones(3, 1, 28, 28), update_mask=update_mask)
    for a, b in zip(plain, masked, strict=True):
        assert torch.equal(a, b)


def test_update_mask_rescales_partial_windows_and_propagates():
    torch.manual_seed(0)
    emb = ConvEmbed(1, 8, kernel=3, stride=2, padding=1)
    x = torch.randn(2, 1, 8, 8)
    visible = torch.ones(2, 1, 8, 8)
    visible[:, :, :4, :4] = 0
    y_upd, nxt = emb(x, visible, reweight="pre_norm")
    y_raw, nxt_raw = emb(x, visible, reweight="mask_only")
    assert torch.equal(nxt, nxt_raw)
    expected = torch.ones(2, 1, 4, 4)
    expected[..., :2, :2] = 0  # windows whose image pixels all lie in rows/cols 0..3
    expected[..., 0, 1] = expected[..., 1, 0] = 1  # ... minus those reaching row/col 4
    assert torch.equal(nxt, (window_count(visible, 3, 2, 1) > 0).float())
    assert not torch.allclose(y_upd, y_raw)
    # windows wholly in the visible region are untouched by the update mask
    torch.testing.assert_close(y_upd[..., 3, 3], y_raw[..., 3, 3])


def test_post_norm_scales_the_normalised_tokens_and_pre_norm_only_the_bias():
    """The two orders of the re-weighting: after LayerNorm a token's size carries its visible
    fraction; before it, LayerNorm removes the scale and leaves the bias divided by r."""
    torch.manual_seed(0)
    emb = ConvEmbed(1, 8, kernel=3, stride=2, padding=1)
    x, visible = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    visible[:, :, :4, :4] = 0
    ratio, _ = update_ratio(visible, 3, 2, 1)
    plain, _ = emb(x, visible, reweight="mask_only")
    post, _ = emb(x, visible, reweight="post_norm")
    assert torch.equal(post, plain * ratio)
    assert post[..., 0, 0].abs().max() == 0, "a fully hidden window is zero"
    pre, _ = emb(x, visible, reweight="pre_norm")
    z = torch.nn.functional.conv2d(x * visible, emb.proj.weight, None, 2, 1)
    part = ratio > 0
    bias_only = emb.norm((z + emb.proj.bias.view(1, -1, 1, 1) / ratio.clamp(min=1e-6)).permute(0, 2, 3, 1))
    torch.testing.assert_close(pre.permute(0, 2, 3, 1)[part[:, 0]], bias_only[part[:, 0]], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="reweight must be one of"):
        emb(x, visible, reweight="after")


def test_no_update_mask_is_a_plain_cvt_on_the_masked_image(tiny_cvt):
    x = torch.randn(2, 1, 28, 28)
    visible = 1 - pixel_block_mask(2, 28, 28, 4, 0.5)
    with torch.no_grad():
        control = tiny_cvt.forward_stages(x, visible, update_mask="none")
        plain = tiny_cvt.forward_stages(x * visible)
        propagated = tiny_cvt.forward_stages(x, visible, update_mask="mask_only")
    assert all(torch.equal(a, b) for a, b in zip(control, plain, strict=True))
    assert torch.equal(control[0], propagated[0]), "the first stage sees the same masked image"
    assert not torch.allclose(control[1], propagated[1]), "mask_only zeroes every later stage's input; none does not"


def test_fully_masked_window_gives_zero_next_mask_and_no_nan():
    emb = ConvEmbed(1, 8, kernel=3, stride=2, padding=1)
    visible = torch.ones(1, 1, 16, 16)
    visible[..., 4:12, 4:12] = 0
    y, nxt = emb(torch.randn(1, 1, 16, 16), visible)
    assert nxt[0, 0, 3, 3] == 0.0 and nxt[0, 0, 0, 0] == 1.0
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("update_mask", UPDATE_MASKS)
def test_fully_masked_windows_under_bf16_autocast_stay_finite(tiny_cvt, update_mask):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28) * 1e3
    hole = pixel_block_mask(4, 28, 28, 14, 0.75)  # big holes: whole windows masked at every stage
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = tiny_cvt.forward_stages(x, 1.0 - hole, update_mask)
    assert all(torch.isfinite(m.float()).all() for m in maps)
    all_masked = torch.zeros(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = tiny_cvt.forward_stages(x, all_masked, update_mask)
    assert all(torch.isfinite(m.float()).all() for m in maps)


def test_masked_pixels_do_not_reach_the_encoder(tiny_cvt):
    x = torch.randn(2, 1, 28, 28)
    hole = pixel_block_mask(2, 28, 28, 4, 0.5)
    noisy = x + hole * torch.randn_like(x) * 100
    with torch.no_grad():
        a = tiny_cvt.forward_stages(x, 1 - hole)[-1]
        b = tiny_cvt.forward_stages(noisy, 1 - hole)[-1]
    torch.testing.assert_close(a, b)


def test_stage_lists_must_agree():
    with pytest.raises(ValueError, match="one entry per stage"):
        ConvVisionTransformer(dims=(8, 16), num_heads=(1, 2, 2))


def test_gradients_reach_every_parameter(tiny_cvt):
    tiny_cvt.train()
    hole = pixel_block_mask(2, 28, 28, 4, 0.5)
    tiny_cvt.forward_features(torch.randn(2, 1, 28, 28), PixelMask(1 - hole)).sum().backward()
    missing = [n for n, p in tiny_cvt.named_parameters() if p.grad is None]
    assert not missing, missing


def test_forward_intermediates_are_the_stages():
    torch.manual_seed(0)
    enc = create_backbone("cvt_micro_s2", in_chans=1, dims=(8, 16, 32), num_heads=(1, 1, 2), depths=(1, 1, 3)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        final, maps = enc.forward_intermediates(x)
        assert torch.equal(final, enc.forward_features(x))
        stages = enc.forward_stages(x)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 14, 14), (2, 16, 7, 7), (2, 32, 4, 4)]
        for m, s in zip(maps[:-1], stages[:-1], strict=True):
            torch.testing.assert_close(m, s, rtol=0, atol=0)
        normed = enc.forward_intermediates(x, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[-1], stages[-1], rtol=0, atol=0)  # the final norm: last stage only
        torch.testing.assert_close(normed[0], maps[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[1, 3\] \(the last n of the 3 stages\)"):
        enc.forward_intermediates(x, 4)


def test_forward_last_blocks_ends_with_forward_features():
    torch.manual_seed(0)
    enc = create_backbone("cvt_micro_s2", in_chans=1, dims=(8, 16, 32), num_heads=(1, 1, 2), depths=(1, 1, 3)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        outs = enc.forward_last_blocks(x, 3)
        assert len(outs) == 3 and all(o.shape == (2, 16, 32) for o in outs)
        torch.testing.assert_close(outs[-1], enc.forward_features(x))
    with pytest.raises(ValueError, match=r"\[1, 3\] \(the last stage's depth\)"):
        enc.forward_last_blocks(x, 4)


@pytest.mark.parametrize("size", [2, 7, 14])
def test_conv_projection_bf16_path_equals_the_strided_conv(size):
    """Under CPU bf16 the strided k/v projection runs as a sampled stride-1 conv: same shape, same numbers."""
    torch.manual_seed(0)
    proj = ConvProjection(8, stride=2)
    x = torch.randn(3, 8, size, size)
    ref = proj.bn(proj.conv(x)).flatten(2).transpose(1, 2)  # the plain strided conv, fp32
    with torch.autocast("cpu", torch.bfloat16):
        assert bf16_on_cpu(x)
        out = proj(x)
    assert out.shape == ref.shape == (3, ((size + 1) // 2) ** 2, 8)
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.02)
    assert not bf16_on_cpu(x)
    torch.testing.assert_close(proj(x), ref)  # fp32: on the 2x2 map the tap-matrix product, equal up to rounding


def test_token_mask_hides_the_pixels_of_masked_last_stage_tokens(tiny_cvt):
    x = torch.randn(2, 1, 28, 28)
    assert tiny_cvt.grid_size(28, 28) == (4, 4)
    assert tiny_cvt.forward_features(x).shape[1] == 16
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True  # the top row of the 4 x 4 grid: pixel rows 0-6
    visible = torch.ones(2, 1, 28, 28)
    visible[..., :7, :] = 0
    torch.testing.assert_close(tiny_cvt.forward_features(x, TokenMask(mask)),
                               tiny_cvt.forward_features(x, PixelMask(visible)))
    with pytest.raises(TypeError, match="ConvVisionTransformer takes masks of kind mix, pixels, token_mask"):
        tiny_cvt.forward_features(x, KeepTokens(torch.zeros(2, 3, dtype=torch.long)))
