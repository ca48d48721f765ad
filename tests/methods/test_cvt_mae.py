from __future__ import annotations

import pytest
import torch

from mimkit.backbones import create_backbone
from mimkit.config import ConfigError
from mimkit.methods import check_method_cfg, create_method
from mimkit.methods.losses import inpainting_loss, masked_mse, patchify

TINY_CVT = dict(in_chans=1, dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1))


def _cvt_mae(**kw):
    torch.manual_seed(0)
    enc = create_backbone("cvt_micro_s2", **TINY_CVT)
    return create_method({"name": "cvt_mae", "decoder_depth": 1, **kw}, enc)


def test_forward_shapes_and_mask_ratio():
    m = _cvt_mae(mask_ratio=0.5, mask_size=4)
    out = m(torch.randn(3, 1, 28, 28))
    assert out.pred.shape == (3, 1, 28, 28) and out.mask.shape == (3, 1, 28, 28)
    # 49 blocks of 4x4, round(24.5) = 24 masked per sample
    assert torch.equal(out.mask.sum(dim=(1, 2, 3)), torch.full((3,), 24.0 * 16))
    assert set(out.logs) == {"l1_valid", "l1_hole", "tv"}


def test_loss_is_the_inpainting_loss_of_pred_and_mask():
    m = _cvt_mae()
    x = torch.randn(2, 1, 28, 28)
    out = m(x)
    expected, _ = inpainting_loss(out.pred, x, out.mask)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_scores_masked_blocks_only(norm_pix):
    m = _cvt_mae(loss="mae", norm_pix_loss=norm_pix, mask_size=7)
    x = torch.randn(2, 1, 28, 28)
    out = m(x)
    block_mask = patchify(out.mask, 7).amax(-1)
    torch.testing.assert_close(out.loss, masked_mse(patchify(out.pred, 7), patchify(x, 7), block_mask, norm_pix))


def test_reconstruct_undoes_block_normalisation():
    m = _cvt_mae(loss="mae", norm_pix_loss=True, mask_size=7)
    x = torch.randn(2, 1, 28, 28)
    out = m(x)
    target = patchify(x, 7)
    mean, std = target.mean(-1, keepdim=True), target.std(-1, keepdim=True)
    out.pred = torch.zeros_like(x)  # a zero prediction means "each block's own mean"
    recon, mask = m.reconstruct(x, out)
    torch.testing.assert_close(patchify(recon, 7), mean.expand_as(target), atol=1e-5, rtol=1e-5)
    assert std.min() > 0 and mask.shape == (2, 1, 28, 28)


@pytest.mark.parametrize("flag, on, off", [
    ("skip", True, False), ("update_mask", True, False), ("update_mask", "post_norm", "pre_norm"),
    ("update_mask", "none", "mask_only"), ("update_mask", "post_norm", "none"),
])
def test_switches_change_the_model(flag, on, off):
    x = torch.randn(2, 1, 28, 28)
    model_on, model_off = _cvt_mae(**{flag: on}), _cvt_mae(**{flag: off})
    torch.manual_seed(1)
    on = model_on(x)
    torch.manual_seed(1)
    off = model_off(x)
    assert torch.equal(on.mask, off.mask)
    assert not torch.allclose(on.pred, off.pred)


@pytest.mark.parametrize("bad, match", [
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_mode": "grid"}, "mask_mode"),
    ({"loss": "l2"}, "method.loss"),
    ({"norm_pix_loss": True}, "norm_pix_loss"),
    ({"mask_size": 0}, "mask_size"),
    ({"update_mask": "after_norm"}, "method.update_mask must be one of none, pre_norm, post_norm, mask_only"),
    ({"decoder_fuse_kernel": 2}, "decoder_fuse_kernel must be an odd positive size"),
    ({"propagate": "pixel"}, "method.propagate must be one of window, cell"),
    ({"propagate": "cell", "update_mask": "none"}, "method.propagate=cell works on the propagated mask"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        check_method_cfg({"name": "cvt_mae", **bad})


def test_vit_encoder_is_refused_with_the_valid_backbones():
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="cvt_micro_s2"):
        create_method({"name": "cvt_mae"}, enc)


def test_mask_size_must_divide_the_image():
    with pytest.raises(ValueError, match="mask block size 8"):
        _cvt_mae(mask_size=8)(torch.randn(1, 1, 28, 28))


def test_older_configs_true_and_false_keep_their_meaning():
    assert check_method_cfg({"name": "cvt_mae", "update_mask": True}).update_mask == "pre_norm"
    assert check_method_cfg({"name": "cvt_mae", "update_mask": False}).update_mask == "mask_only"
