"""No leakage between mixed images, for every backbone that takes pair mixes (MixMAE's inputs).

Changing the second image of a pair must leave the encoder's outputs at the first image's positions
unchanged: exactly in fp32, within tolerance under bf16 autocast. Evaluation mode: in training mode
the CvT's BatchNorm pools statistics over the batch, as it does for any batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILY, family, preset

from mimkit.backbones import backbones_taking, create_backbone
from mimkit.masking import MixPairs, mix_pairs, pair_mask
from mimkit.masking.mixing import upsample_labels

MIXING = backbones_taking("mix")


def _encoder(name: str, padded: bool = False) -> tuple[torch.nn.Module, int]:
    """A tiny encoder and its input side; for the Swin two blocks per stage, the second shifted (the
    harder case), and with ``padded`` an input whose maps are not whole windows."""
    torch.manual_seed(0)
    settings = dict(TINY_FAMILY[family(name)])
    if family(name) == "SwinTransformer":
        patch = preset(name).get("patch_size", 4)
        img = 8 * patch
        settings |= {"shifted": True, "depths": (2, 2)}
        enc = create_backbone(name, img_size=img, in_chans=1, **settings).eval()
        return enc, 6 * patch if padded else img  # 6x6 and 3x3 maps under 4x4 and 2x2 windows
    settings["depths"] = (1, 2, 2)
    return create_backbone(name, img_size=32, in_chans=1, **settings).eval(), 32


def _outputs(enc, images, labels, embeds=None, **kw):
    pixels = upsample_labels(labels, images.shape[-2:])
    return enc.forward_features(mix_pairs(images, pixels), MixPairs(labels, embeds, **kw))


def test_some_backbones_take_pair_mixes():
    assert {"SwinTransformer", "ConvVisionTransformer"} <= {family(n) for n in MIXING}


@pytest.mark.parametrize("name, padded", [(n, False) for n in MIXING]
                         + [(n, True) for n in MIXING if family(n) == "SwinTransformer"])
def test_the_partner_image_does_not_reach_the_own_positions(name, padded):
    enc, img = _encoder(name, padded)
    grid = enc.grid_size(img, img)
    labels = pair_mask(grid, 0.5, generator=torch.Generator().manual_seed(0))
    own = labels.flatten() == 0
    embeds = tuple(torch.randn(2, d) for d in enc.stage_dims)
    x = torch.randn(4, 1, img, img)
    y = x.clone()
    y[3] = torch.randn(1, img, img)  # image 0's partner
    with torch.no_grad():
        for kw in ({}, {"embeds": embeds}):
            a, b = _outputs(enc, x, labels, **kw), _outputs(enc, y, labels, **kw)
            assert torch.equal(a[0, own], b[0, own]), f"{name}: the partner leaked into image 0's tokens"
            assert not torch.allclose(a[0, ~own], b[0, ~own]), "the partner's own positions must change"
        # the same inputs without the restriction: the change reaches image 0 (the test can fail)
        plain = enc.forward_features(mix_pairs(x, upsample_labels(labels, (img, img))))
        changed = enc.forward_features(mix_pairs(y, upsample_labels(labels, (img, img))))
        assert not torch.allclose(plain[0, own], changed[0, own])


@pytest.mark.parametrize("name", MIXING)
def test_no_leakage_under_bf16_autocast(name):
    enc, img = _encoder(name)
    labels = pair_mask(enc.grid_size(img, img), 0.5, generator=torch.Generator().manual_seed(1))
    own = labels.flatten() == 0
    x = torch.randn(4, 1, img, img)
    y = x.clone()
    y[3] = 10 * torch.randn(1, img, img)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _outputs(enc, x, labels), _outputs(enc, y, labels)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[0, own].float(), b[0, own].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", MIXING)
def test_per_sample_labels_keep_images_apart_too(name):
    enc, img = _encoder(name)
    grid = enc.grid_size(img, img)
    labels = torch.stack([pair_mask(grid, 0.5, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    x = torch.randn(4, 1, img, img)
    y = x.clone()
    y[3] = torch.randn(1, img, img)
    with torch.no_grad():
        a, b = _outputs(enc, x, labels), _outputs(enc, y, labels)
    own = labels[0].flatten() == 0
    assert torch.equal(a[0, own], b[0, own])


def test_the_cvt_refuses_a_mix_without_an_update_mask():
    enc, img = _encoder(next(n for n in MIXING if family(n) == "ConvVisionTransformer"))
    labels = pair_mask(enc.grid_size(img, img), 0.5)
    with pytest.raises(Exception, match="update_mask"):
        _outputs(enc, torch.randn(2, 1, img, img), labels, update_mask="none")
