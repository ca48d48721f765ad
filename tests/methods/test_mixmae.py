"""MixMAE on the Swin and on the CvT: dual reconstruction never sees what it predicts, pairs, refusals."""

from __future__ import annotations

import pytest
import torch

from mimkit.backbones import create_backbone
from mimkit.errors import ConfigError
from mimkit.methods import create_method
from mimkit.methods.mixmae import MixMAE

SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
ENCODERS = {
    "swin": ("swin_tiny_p2", dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2))),
    "cvt": ("cvt_tiny_s4", dict(dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1), strides=(4, 2, 1))),
}


def _mixmae(kind: str, **cfg) -> MixMAE:
    torch.manual_seed(0)
    name, kwargs = ENCODERS[kind]
    return create_method({"name": "mixmae", **SMALL, **cfg}, create_backbone(name, in_chans=1, **kwargs))


@pytest.mark.parametrize("kind, grid", [("swin", 7), ("cvt", 4)])
def test_shapes_on_the_last_stage_grid(kind, grid):
    method = _mixmae(kind)
    out = method(torch.randn(4, 1, 28, 28))
    block = 28 // grid
    assert out.pred.shape == (4, grid * grid, block * block) and out.mask.shape == (4, grid * grid)
    assert (out.mask.sum(1) == grid * grid // 2).all() and out.mask.dtype == torch.float32
    assert (out.mask == out.mask[:1]).all()  # one mask per step, shared by the batch
    assert out.inputs.shape == (4, 1, 28, 28)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_no_prediction_sees_the_pixels_it_predicts(kind):
    """Image i's prediction at the cells its own sample gave away does not depend on image i's
    pixels there, nor at its other cells on its pixels there: every cell is scored where it was hidden."""
    method = _mixmae(kind).eval()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    with torch.no_grad():
        base = method(x)
    block = method.block
    hidden = base.mask[0].bool()  # 1: sample 0 showed its partner there
    cells = hidden.view(1, 1, 28 // block, 1, 28 // block, 1).expand(1, 1, -1, block, -1, block).reshape(28, 28)
    for region, scored in ((cells, hidden), (~cells, ~hidden)):
        y = x.clone()
        y[0, 0][region] = torch.randn(int(region.sum()))
        torch.manual_seed(1)
        with torch.no_grad():
            out = method(y)
        assert torch.equal(out.mask, base.mask)
        assert torch.equal(out.pred[0, scored], base.pred[0, scored]), f"{kind}: a prediction saw its own target"
        assert not torch.equal(out.pred[0, ~scored], base.pred[0, ~scored])


def test_cells_that_would_split_a_swin_token_are_refused():
    """At 28 px a three-stage Swin has 7 px cells on its 4x4 grid, but 8 px tokens: refused."""
    torch.manual_seed(0)
    enc = create_backbone("swin_tiny3_p2", img_size=28, in_chans=1, embed_dims=(16, 32, 64), depths=(1, 1, 1),
                          num_heads=(1, 2, 2))
    with pytest.raises(ConfigError, match="not a multiple of its 8 px tokens"):
        create_method({"name": "mixmae", **SMALL}, enc)
    from mimkit.masking import MixPairs

    with pytest.raises(ValueError, match="does not tile stage 0"):
        enc.forward_features(torch.randn(2, 1, 28, 28), MixPairs(torch.zeros(4, 4, dtype=torch.long)))


def test_pairs_need_an_even_batch_and_whole_blocks():
    method = _mixmae("swin")
    assert method.batch_multiple == 2
    with pytest.raises(ValueError, match="even batch"):
        method(torch.randn(3, 1, 28, 28))
    with pytest.raises(ConfigError, match="14x14"):
        method.check_image_size(14, 14)
    method.check_image_size(28, 28)


def test_settings_are_checked():
    for bad, match in (({"mix_ratio": 1.0}, "mix_ratio"), ({"update_mask": "none"}, "update_mask"),
                       ({"norm_pix_eps": 0.0}, "norm_pix_eps"), ({"decoder_dim": 30, "decoder_heads": 3}, "by 4")):
        with pytest.raises(ConfigError, match=match):
            _mixmae("swin", **bad)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_mix_embedding_is_trained_and_optional(kind):
    method = _mixmae(kind)
    method(torch.randn(4, 1, 28, 28)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.mix_embeds)
    assert _mixmae(kind, mix_embed=False).mix_embeds is None


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_bf16_autocast_gives_a_finite_loss_and_float32_masks(kind):
    method = _mixmae(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(torch.randn(4, 1, 28, 28))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.mask.dtype == torch.float32  # masks stay float32 under autocast


def test_reconstruction_undoes_the_patch_normalisation():
    """A prediction equal to the normalised target reconstructs the image."""
    from mimkit.methods.losses import patch_norm_stats, patchify

    method = _mixmae("swin").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = method(x)
    target = patchify(x, method.block)
    mean, std = patch_norm_stats(target, method.cfg.norm_pix_eps)
    out.pred = (target - mean) / std
    recon, mask = method.reconstruct(x, out)
    torch.testing.assert_close(recon, x, atol=1e-5, rtol=1e-5)
    assert mask.shape == (4, 1, 28, 28) and 0.4 < float(mask.mean()) < 0.6
