"""Released ViT weights into mimkit's ViT (``init=timm:`` / ``local-dir:`` / ``hf-hub:``); the learned position
embedding."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import save_for_hf

from mimkit.backbones import create_backbone
from mimkit.backbones.from_timm import is_timm_source, load_timm_weights
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.errors import ConfigError
from mimkit.methods import create_method

#: A timm ViT of mimkit's ``vit_tiny_p4`` shape at 28 px, one grey channel, small.
ARGS = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def _timm_vit(**over: object) -> torch.nn.Module:
    """timm's own ViT, every weight moved off its initialisation (a load that does nothing shows)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**ARGS, **over})
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _saved(tmp_path, model: torch.nn.Module, **over: object) -> str:
    """The model in timm's own save layout (``save_for_hf``), as ``init`` names it."""
    save_for_hf(model, tmp_path / "timm_vit", model_args={**ARGS, **over}, safe_serialization=True)
    return f"local-dir:{tmp_path / 'timm_vit'}"


def _mimkit_vit(**over: object) -> torch.nn.Module:
    return create_backbone("vit_tiny_p4", **{**ARGS, "num_classes": 0, **over}).eval()


def test_timm_weights_give_timm_features(tmp_path):
    model = _timm_vit()
    ours = _mimkit_vit(pos_embed="learned")
    load_timm_weights(ours, _saved(tmp_path, model))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), model.forward_features(x), atol=1e-5, rtol=1e-5)
    # Another input size: the learned grid is resampled, as timm's dynamic size does.
    with torch.no_grad():
        assert ours.forward_features(torch.randn(2, 1, 20, 20)).shape == (2, 1 + 25, 32)


def test_a_learned_position_embedding_needs_a_learned_encoder(tmp_path):
    source = _saved(tmp_path, _timm_vit())
    with pytest.raises(ConfigError, match="learned position embedding.*backbone.pos_embed=learned"):
        load_timm_weights(_mimkit_vit(), source)


def test_a_sin_cos_position_embedding_loads_into_either(tmp_path):
    """A mimkit export carries its fixed sin-cos embedding as timm's pos_embed (zero at the class token)."""
    model = _timm_vit()
    with torch.no_grad():
        model.pos_embed.copy_(torch.cat([torch.zeros(1, 1, 32), sincos_2d(7, 7, 32)], dim=1))
    source = _saved(tmp_path, model)
    x = torch.randn(2, 1, 28, 28)
    for ours in (_mimkit_vit(), _mimkit_vit(pos_embed="learned")):
        load_timm_weights(ours, source)
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_features(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("over, message", [
    (dict(depth=1), "depth 2.*choose the backbone"),
    (dict(embed_dim=64, num_heads=2), "width 32"),
])
def test_other_sizes_are_refused(tmp_path, over, message):
    source = _saved(tmp_path, _timm_vit())
    with pytest.raises(ConfigError, match=message):
        load_timm_weights(_mimkit_vit(pos_embed="learned", **over), source)


@pytest.mark.parametrize("over, message", [
    (dict(reg_tokens=2), "register tokens"),
    (dict(init_values=0.1), "layer scale"),
])
def test_vit_variants_mimkit_has_not_are_refused(tmp_path, over, message):
    source = _saved(tmp_path, _timm_vit(**over), **over)
    with pytest.raises(ConfigError, match=message):
        load_timm_weights(_mimkit_vit(pos_embed="learned"), source)


def test_unreachable_or_unknown_weights_are_one_line(tmp_path):
    for source in ("timm:no_such_vit_xyz", f"local-dir:{tmp_path / 'missing'}"):
        with pytest.raises(ConfigError, match=f"init={source}: timm cannot load it") as err:
            load_timm_weights(_mimkit_vit(), source)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="use a ViT backbone"):
        load_timm_weights(create_backbone("cvt_tiny_s4", in_chans=1), "timm:vit_tiny_patch16_224")
    assert is_timm_source("hf-hub:facebook/x") and not is_timm_source("runs/mae_fmnist")


def test_learned_position_embedding_is_trained():
    """The learned grid is a parameter every step updates (MAE drops tokens after adding it)."""
    encoder = create_backbone("vit_tiny_p4", **{**ARGS, "pos_embed": "learned"})
    mae = create_method({"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}, encoder)
    mae(torch.randn(4, 1, 28, 28)).loss.backward()
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0
    assert "pos_embed" in encoder.no_weight_decay()
    with pytest.raises(ConfigError, match="backbone.pos_embed must be one of sincos, learned"):
        create_backbone("vit_tiny_p4", pos_embed="rope")


def test_a_learned_grid_loads_at_another_image_size(tmp_path):
    """Pre-trained at 28 px, used at 40: the 7x7 grid is resampled to 10x10 on load, the rest as it was."""
    from safetensors.torch import save_file

    from mimkit.engine.checkpoint import check_fits, load_weights

    small = _mimkit_vit(pos_embed="learned")
    with torch.no_grad():
        small.pos_embed.add_(torch.randn_like(small.pos_embed))
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    build = lambda: _mimkit_vit(pos_embed="learned", img_size=40)  # noqa: E731
    check_fits(build, tmp_path / "ckpt" / "model.safetensors")
    large = build()
    load_weights(large, tmp_path / "ckpt")
    assert large.pos_embed.shape == (1, 100, 32)
    assert torch.equal(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    from timm.layers import resample_abs_pos_embed

    torch.testing.assert_close(large.pos_embed.detach(), resample_abs_pos_embed(small.pos_embed.detach(), [10, 10],
                                                                                 [7, 7], num_prefix_tokens=0))
    from mimkit.engine.checkpoint import check_shapes
    from mimkit.errors import CheckpointMismatchError

    check_shapes({"encoder.pos_embed": (1, 100, 32)}, {"encoder.pos_embed": (1, 49, 32)}, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="pos_embed"):  # another width is no grid to resample
        check_shapes({"encoder.pos_embed": (1, 100, 64)}, {"encoder.pos_embed": (1, 49, 32)}, tmp_path)
