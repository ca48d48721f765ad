"""timm's ``forward_intermediates`` convention on every registered backbone, and the multi-block
evaluation features built from ``forward_last_blocks``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import family, tiny_backbone_kwargs

from mimkit.backbones import BACKBONES, create_backbone
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.evaluation.features import extract_features

# Deeper than the shared tiny settings, so that picking blocks or stages means something.
DEEPER = {
    "VisionTransformer": dict(depth=3),
    "ConvVisionTransformer": dict(depths=(1, 1, 2)),
    "SwinTransformer": dict(embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=(1, 2, 2)),
}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs, img = tiny_backbone_kwargs(name)
    torch.manual_seed(0)
    enc = create_backbone(name, **{**kwargs, **DEEPER[family(name)]}).eval()
    return enc, torch.randn(2, 3, img, img)


def _units(enc: torch.nn.Module) -> int:
    """What ``indices`` counts: the blocks of a ViT, the stages of a hierarchical backbone."""
    return len(enc.stages) if hasattr(enc, "stages") else len(enc.blocks)


def _grids(enc: torch.nn.Module, size: int) -> list[tuple[int, int]]:
    """The token grid of every block (ViT) or stage for a ``size x size`` input."""
    name = type(enc).__name__
    if name == "VisionTransformer":
        return [enc.grid_size(size, size)] * len(enc.blocks)
    if name == "ConvVisionTransformer":
        return enc.stage_grids(size, size)
    side, grids = size // enc.patch_size, []
    for _ in enc.stages:
        grids.append((side, side))
        side = -(-side // 2)
    return grids


def _widths(enc: torch.nn.Module) -> list[int]:
    return list(enc.stage_dims) if hasattr(enc, "stages") else [enc.embed_dim] * len(enc.blocks)


NAMES = sorted(BACKBONES)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_final_is_forward_features(name):
    enc, x = _build(name)
    final, inter = enc.forward_intermediates(x)
    assert torch.equal(final, enc.forward_features(x))
    assert len(inter) == _units(enc)
    assert enc.forward_head(final, pre_logits=True).shape == (2, enc.num_features)
    assert torch.equal(enc.forward_intermediates(x, 2, intermediates_only=True)[-1], inter[-1])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_norm_applies_the_final_norm(name):
    enc, x = _build(name)
    final = enc.forward_features(x)
    normed_tokens = enc.forward_intermediates(x, 1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
    (raw_tokens,) = enc.forward_intermediates(x, 1, output_fmt="NLC", intermediates_only=True)
    if family(name) == "VisionTransformer":  # the class token comes separately, as in timm
        ((patches, prefix),) = enc.forward_intermediates(x, 1, return_prefix_tokens=True, norm=True,
                                                         output_fmt="NLC", intermediates_only=True)
        assert torch.equal(patches, normed_tokens) and prefix.shape == (2, 1, enc.embed_dim)
        normed = torch.cat([prefix, patches], dim=1)
    else:
        normed = normed_tokens
    torch.testing.assert_close(normed, final, rtol=0, atol=0)
    assert raw_tokens.shape == normed_tokens.shape
    assert not torch.allclose(raw_tokens, normed_tokens)  # norm=False gives the raw block outputs
    # the final norm is applied per token: re-applying it to the raw output gives the normed one
    torch.testing.assert_close(enc.norm(raw_tokens), normed_tokens)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_int_and_list_indices_agree(name):
    enc, x = _build(name)
    n = _units(enc)
    by_int = enc.forward_intermediates(x, 2, intermediates_only=True)
    for indices in ([-2, -1], [n - 2, n - 1], (n - 1, -2), [-1, n - 2, -2]):  # outputs come in depth order
        taken = enc.forward_intermediates(x, indices, intermediates_only=True)
        assert len(taken) == 2 and all(torch.equal(a, b) for a, b in zip(by_int, taken, strict=True)), indices
    every = enc.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(every, enc.forward_intermediates(x, n, intermediates_only=True),
                                                strict=True))
    (first,) = enc.forward_intermediates(x, [0], intermediates_only=True, stop_early=True)
    assert torch.equal(first, every[0])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_nchw_maps_and_nlc_tokens(name):
    enc, x = _build(name)
    maps = enc.forward_intermediates(x, intermediates_only=True)
    tokens = enc.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    grids, widths = _grids(enc, x.shape[-1]), _widths(enc)
    assert [tuple(m.shape) for m in maps] == [(2, d, h, w) for d, (h, w) in zip(widths, grids, strict=True)]
    assert [tuple(t.shape) for t in tokens] == [(2, h * w, d) for d, (h, w) in zip(widths, grids, strict=True)]
    for m, t in zip(maps, tokens, strict=True):
        assert m.is_contiguous()
        assert torch.equal(m.flatten(2).transpose(1, 2), t)


@pytest.mark.parametrize("name", NAMES)
def test_bad_indices_and_output_fmt_are_refused(name):
    enc, x = _build(name)
    n = _units(enc)
    for indices in (0, n + 1, [n], [-n - 1], []):
        with pytest.raises(ValueError, match=rf"indices must be in \[1, {n}\].*\[{-n}, {n - 1}\]"):
            enc.forward_intermediates(x, indices)
    with pytest.raises(ValueError, match="output_fmt must be one of NCHW, NLC, got 'NHWC'"):
        enc.forward_intermediates(x, output_fmt="NHWC")


def _old_last_blocks(enc: torch.nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The multi-block evaluation's tokens as they were computed before ``forward_intermediates``
    took timm's convention: the last ``n`` blocks (of the last stage), each through the final norm.
    """
    name = type(enc).__name__
    if name == "VisionTransformer":
        tokens = enc.embed(x)
        tokens = torch.cat([enc.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        outs = []
        for block in enc.blocks:
            tokens = block(tokens)
            outs.append(enc.norm(tokens))
        return outs[-n:]
    if name == "ConvVisionTransformer":
        for stage in enc.stages[:-1]:
            x, _ = stage(x)
        x, _ = enc.stages[-1].embed(x)
        _, _, h, w = x.shape
        tokens, outs = x.flatten(2).transpose(1, 2), []
        for block in enc.stages[-1].blocks:
            tokens = block(tokens, h, w)
            outs.append(enc.norm(tokens))
        return outs[-n:]
    tokens = enc.patch_embed(x)
    if enc.abs_pos_embed:
        h, w = tokens.shape[1:3]
        tokens = tokens + sincos_2d(h, w, tokens.shape[-1]).view(1, h, w, -1)
    for stage in enc.stages[:-1]:
        tokens = stage.downsample(tokens)
        for block in stage.blocks:
            tokens = block(tokens)
    tokens, outs = enc.stages[-1].downsample(tokens), []
    for block in enc.stages[-1].blocks:
        tokens = block(tokens)
        outs.append(enc.norm(tokens).flatten(1, 2))
    return outs[-n:]


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_multi_block_evaluation_features_are_unchanged(name):
    enc, x = _build(name)
    depth = len(enc.stages[-1].blocks) if hasattr(enc, "stages") else len(enc.blocks)
    batches = [(x, torch.arange(2)), (x.flip(0), torch.arange(2))]
    one, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False)
    many, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False, blocks=depth)
    expected = torch.cat([
        torch.cat([enc.forward_head(t, pre_logits=True) for t in _old_last_blocks(enc, images, depth)], dim=-1)
        for images, _ in batches
    ])
    torch.testing.assert_close(many, expected, rtol=0, atol=0)
    assert many.shape == (4, enc.num_features * depth)
    torch.testing.assert_close(many[:, -enc.num_features:], one, rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"indices must be in \[1, {depth}\]"):
        enc.forward_last_blocks(x, depth + 1)
