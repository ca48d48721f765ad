from __future__ import annotations

import pytest
import torch

from mimkit.backbones import create_backbone
from mimkit.config import ConfigError
from mimkit.methods import check_method_cfg, create_method
from mimkit.methods.losses import masked_mse, patch_norm_stats, patchify, unpatchify

DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _mae(norm_pix: bool = True, in_chans: int = 1, img_size: int = 28, **kw):
    torch.manual_seed(0)
    enc = create_backbone("vit_tiny_p4", img_size=img_size, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2)
    return create_method({"name": "mae", **DECODER, "norm_pix_loss": norm_pix, **kw}, enc)


def test_forward_shapes(tiny_mae):
    out = tiny_mae(torch.randn(4, 1, 28, 28))
    assert out.pred.shape == (4, 49, 16)
    assert out.mask.shape == (4, 49)
    assert (out.mask.sum(1) == 37).all()  # 49 - int(49 * 0.25)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_mask_ratio_setting_is_used():
    mae = _mae(mask_ratio=0.5)
    out = mae(torch.randn(2, 1, 28, 28))
    assert (out.mask.sum(1) == 25).all()  # keeps int(24.5) = 24


def test_encoder_sees_only_visible_tokens(tiny_mae, monkeypatch):
    seen = {}
    original = tiny_mae.encoder.forward_features

    def spy(x, mask=None):
        seen["keep_idx"] = mask.idx
        out = original(x, mask)
        seen["tokens"] = out.shape
        return out

    monkeypatch.setattr(tiny_mae.encoder, "forward_features", spy)
    out = tiny_mae(torch.randn(2, 1, 28, 28))
    assert seen["keep_idx"].shape == (2, 12)
    assert seen["tokens"] == (2, 13, 32)
    # the kept tokens are exactly the unmasked ones
    for i in range(2):
        assert set(seen["keep_idx"][i].tolist()) == set(torch.nonzero(out.mask[i] == 0).squeeze(1).tolist())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_masked_mse_of_patches(norm_pix):
    mae = _mae(norm_pix=norm_pix)
    images = torch.randn(3, 1, 28, 28)
    out = mae(images)
    expected = masked_mse(out.pred, patchify(images, 4), out.mask, norm_pix=norm_pix)
    torch.testing.assert_close(out.loss, expected)


def test_other_resolution_and_channels():
    mae = _mae(in_chans=3)
    out = mae(torch.randn(2, 3, 32, 24))
    assert out.pred.shape == (2, 8 * 6, 4 * 4 * 3)
    recon, mask = mae.reconstruct(torch.randn(2, 3, 32, 24), out)
    assert recon.shape == (2, 3, 32, 24) and mask.shape == (2, 1, 32, 24)


def test_reconstruct_norm_pix_maps_back_to_pixels():
    mae = _mae(norm_pix=True)
    images = torch.randn(3, 1, 28, 28) * 2 + 0.5
    out = mae(images)
    target = patchify(images, 4)
    mean, std = patch_norm_stats(target)
    out.pred = (target - mean) / std  # a perfect norm-pix prediction
    recon, mask = mae.reconstruct(images, out)
    torch.testing.assert_close(recon, images, atol=1e-5, rtol=1e-5)
    # without the de-normalisation the output would be the standardised patches, not the images
    assert not torch.allclose(unpatchify(out.pred, 4, 1, (7, 7)), images, atol=1e-2)


def test_reconstruct_without_norm_pix_is_unpatchify():
    mae = _mae(norm_pix=False)
    images = torch.randn(2, 1, 28, 28)
    out = mae(images)
    out.pred = patchify(images, 4)
    recon, _ = mae.reconstruct(images, out)
    torch.testing.assert_close(recon, images)


def test_reconstruct_mask_matches_token_mask(tiny_mae):
    images = torch.randn(2, 1, 28, 28)
    out = tiny_mae(images)
    _, mask = tiny_mae.reconstruct(images, out)
    assert mask.shape == (2, 1, 28, 28)
    per_patch = patchify(mask, 4)  # [N, 49, 16]
    assert torch.equal(per_patch.amax(-1), out.mask)
    assert torch.equal(per_patch.amin(-1), out.mask)


def test_mae_config_validation():
    cfg = check_method_cfg({"name": "mae", "mask_ratio": 0.6, "decoder_dim": 64})
    assert cfg.mask_ratio == 0.6 and cfg.decoder_dim == 64 and cfg.decoder_depth == 2
    with pytest.raises(ConfigError, match="mask_ratio"):
        check_method_cfg({"name": "mae", "mask_ratio": 1.0})
    with pytest.raises(ConfigError, match=r"method\.decoder_width.*valid keys: .*decoder_dim.*, name,"):
        check_method_cfg({"name": "mae", "decoder_width": 3})
    with pytest.raises(ConfigError, match="decoder_dim"):
        check_method_cfg({"name": "mae", "decoder_dim": "wide"})


def test_training_step_reduces_loss():
    """A few Adam steps on one fixed batch lower the loss (the graph trains end to end)."""
    mae = _mae()
    images = torch.randn(8, 1, 28, 28)
    opt = torch.optim.Adam(mae.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 2)  # two alternating masks
        loss = mae(images).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def test_bf16_autocast_forward_backward():
    """The only bf16 test: emulated bf16 is very slow on this CPU, so the input is 8x8 (4 tokens)."""
    mae = _mae(img_size=8)
    images = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(images)
    assert out.loss.dtype == torch.float32
    assert out.mask.dtype == torch.float32
    assert out.pred.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in mae.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_decoder_puts_each_token_back_in_its_place():
    """With no decoder blocks, latent token i only affects the prediction at position keep_idx[i]."""
    from mimkit.masking import random_masking
    from mimkit.methods.decoders import MaskTokenDecoder

    torch.manual_seed(0)
    dec = MaskTokenDecoder(encoder_dim=16, dim=32, depth=0, num_heads=2, out_dim=8)
    m = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))  # keeps 4 of 16
    latent = torch.randn(2, 1 + 4, 16)
    base = dec(latent, m.restore_idx, (4, 4))
    assert base.shape == (2, 16, 8)
    for i in range(4):
        changed = latent.clone()
        changed[:, 1 + i] += 1.0
        diff = (dec(changed, m.restore_idx, (4, 4)) - base).abs().sum(-1)  # [2, 16]
        for n in range(2):
            moved = torch.nonzero(diff[n] > 1e-6).squeeze(1).tolist()
            assert moved == [int(m.keep_idx[n, i])]
    # masked positions all see the same mask token, told apart only by their position embedding
    masked = m.mask[0].bool()
    assert torch.unique(base[0, masked], dim=0).shape[0] == int(masked.sum())
