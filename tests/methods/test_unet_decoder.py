from __future__ import annotations

import pytest
import torch

from mimkit.methods.unet_decoder import UNetDecoder

DIMS, STRIDES = (16, 32, 64), (2, 2, 2)


def _maps(n: int = 2):
    return [torch.randn(n, 16, 14, 14), torch.randn(n, 32, 7, 7), torch.randn(n, 64, 4, 4)]


@pytest.mark.parametrize("skip", [True, False])
def test_output_is_image_sized(skip):
    dec = UNetDecoder(DIMS, STRIDES, out_chans=3, depth=1, skip=skip)
    assert dec(_maps(), (28, 28)).shape == (2, 3, 28, 28)


def test_skip_maps_reach_the_output():
    torch.manual_seed(0)
    maps = _maps()
    with_skip = UNetDecoder(DIMS, STRIDES, 1, depth=1, skip=True).eval()
    without = UNetDecoder(DIMS, STRIDES, 1, depth=1, skip=False).eval()
    changed = [maps[0] + 1.0, maps[1], maps[2]]
    assert not torch.allclose(with_skip(maps, (28, 28)), with_skip(changed, (28, 28)))
    assert torch.equal(without(maps, (28, 28)), without(changed, (28, 28)))


def test_no_skip_variant_has_equal_depth_and_width():
    a = UNetDecoder(DIMS, STRIDES, 1, depth=2, skip=True)
    b = UNetDecoder(DIMS, STRIDES, 1, depth=2, skip=False)
    shapes_a = {n: p.shape for n, p in a.named_parameters()}
    shapes_b = {n: p.shape for n, p in b.named_parameters()}
    assert shapes_a.keys() == shapes_b.keys()
    differ = sorted(n for n in shapes_a if shapes_a[n] != shapes_b[n])
    # only the embedding that reads the concatenation is wider
    assert differ == ["ups.0.embed.proj.weight", "ups.1.embed.proj.weight"]


def test_a_1x1_fusion_reads_only_its_own_position():
    dec = UNetDecoder(DIMS, STRIDES, 1, depth=0, fuse_kernel=1).eval()
    assert [tuple(up.embed.proj.weight.shape[-2:]) for up in dec.ups] == [(1, 1), (1, 1)]
    maps = _maps()
    changed = [maps[0].clone(), maps[1], maps[2]]
    changed[0][..., 5, 5] += 1.0  # one skip position: with no blocks, only its own output pixels move
    diff = (dec(maps, (28, 28)) - dec(changed, (28, 28))).abs()[0, 0]
    moved = diff.nonzero().tolist()
    assert moved and all(r // 2 == 5 and c // 2 == 5 for r, c in moved)
