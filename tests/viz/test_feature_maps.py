"""Attention and PCA feature maps on every registered backbone, their arithmetic, and ``visualize --attention``."""

from __future__ import annotations

import pytest
import torch
from conftest import family, tiny_backbone_kwargs

from mimkit.backbones import BACKBONES, create_backbone
from mimkit.cli import main
from mimkit.data.transforms import Normalize
from mimkit.errors import ConfigError
from mimkit.viz import attention_maps, pca_maps, save_feature_maps
from mimkit.viz.feature_maps import last_attention, recorded_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs, img = tiny_backbone_kwargs(name)
    torch.manual_seed(0)
    return create_backbone(name, **kwargs).eval(), torch.randn(3, 3, img, img)


@pytest.mark.parametrize("name", sorted(BACKBONES))
@torch.no_grad()
def test_maps_of_every_backbone(name, tmp_path):
    enc, x = _build(name)
    pca = pca_maps(enc, x)
    assert pca.shape == (3, 3, *x.shape[-2:]) and 0 <= pca.min() and pca.max() <= 1
    before = enc.forward_features(x)
    windowed = family(name) == "SwinTransformer" and enc.stages[-1].blocks[0].attn.window_size[0] < x.shape[-1] // (
        enc.patch_size * 2 ** (len(enc.stages) - 1))
    if windowed:  # attention within windows: no image-wide map
        with pytest.raises(ConfigError, match="attends within windows"):
            attention_maps(enc, x)
    else:  # a ViT, a CvT, or a Swin whose last window is its whole map
        maps = attention_maps(enc, x)
        assert maps.shape == (3, 1, *x.shape[-2:])
        low, high = maps.amin(dim=(1, 2, 3)), maps.amax(dim=(1, 2, 3))
        assert torch.allclose(low, torch.zeros(3))
        # each map spans [0, 1], unless its last stage attends to a single position (a tiny image)
        assert torch.allclose(high, torch.ones(3)) or torch.equal(high, low), high
    assert torch.equal(enc.forward_features(x), before), "drawing changed what the encoder computes"
    written = save_feature_maps(enc, x, Normalize([0.5] * 3, [0.25] * 3), tmp_path)
    assert {p.name for p in written} == ({"pca.png"} if windowed else {"attention.png", "pca.png"})
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)


@torch.no_grad()
def test_a_swin_attending_within_windows_is_refused():
    kwargs, _ = tiny_backbone_kwargs("swin_tiny_p2")
    enc = create_backbone("swin_tiny_p2", **{**kwargs, "img_size": 32, "window_size": 2}).eval()
    with pytest.raises(ConfigError, match="attends within windows"):
        attention_maps(enc, torch.randn(2, 3, 32, 32))


@torch.no_grad()
def test_recorded_attention_is_the_softmax_of_the_last_blocks_queries_and_keys():
    """Recomputed from the last block's own q and k: the recording captures what the block computes."""
    enc, x = _build("vit_tiny_p4")
    block = enc.blocks[-1]
    seen = {}
    hook = block.norm1.register_forward_hook(lambda m, i, out: seen.update(x=out))
    with recorded_attention(last_attention(enc)) as maps:
        out = enc.forward_features(x)
    hook.remove()
    attn = block.attn
    n, t, d = seen["x"].shape
    qkv = attn.qkv(seen["x"]).reshape(n, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    expected = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    assert len(maps) == 1
    torch.testing.assert_close(maps[0], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out, enc.forward_features(x))


class _TwoHalves(torch.nn.Module):
    """Patch features that differ only between the left and the right half of the grid."""

    def forward_intermediates(self, x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=False):
        g = torch.Generator().manual_seed(0)
        feats = 0.01 * torch.randn(x.shape[0], 8, 4, 4, generator=g)
        feats[:, 0, :, :2] += 1.0
        feats[:, 0, :, 2:] -= 1.0
        return [feats]


@torch.no_grad()
def test_the_first_component_separates_what_the_features_separate():
    first = pca_maps(_TwoHalves(), torch.zeros(2, 1, 16, 16))[:, 0]
    left, right = first[..., :8], first[..., 8:]
    assert (left.mean() - right.mean()).abs() > 0.9, (left.mean(), right.mean())


@pytest.mark.fmnist
def test_visualize_attention_writes_both_pictures(tiny_run_config, tmp_path, capsys):
    from mimkit.engine import pretrain

    run = pretrain(tiny_run_config("train.epochs=0.5"))
    assert main(["visualize", str(run), "--num", "3", "--attention"]) == 0
    printed = capsys.readouterr().out
    for name in ("attention", "pca"):
        assert (run / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"{name} -> {run / (name + '.png')}" in printed
