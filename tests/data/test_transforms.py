from __future__ import annotations

import pytest
import torch
from PIL import Image

from mimkit.data.transforms import (
    Normalize,
    channel_stats,
    pil_eval_transform,
    pil_train_transform,
    random_resized_crop_batch,
    resize_batch,
)


def _images(n=4, c=3, h=20, w=20, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed)).float()


def test_random_resized_crop_shape():
    out = random_resized_crop_batch(_images(h=32, w=24), 16, (0.2, 1.0), True,
                                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32


def test_full_crop_without_flip_is_identity():
    images = _images()
    out = random_resized_crop_batch(images, 20, (1.0, 1.0), False, ratio=(1.0, 1.0),
                                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-3, rtol=0)


def test_full_crop_with_flip_is_identity_or_mirror():
    images = _images(n=16)
    out = random_resized_crop_batch(images, 20, (1.0, 1.0), True, ratio=(1.0, 1.0),
                                    generator=torch.Generator().manual_seed(0))
    flipped = 0
    for o, i in zip(out, images, strict=True):
        if torch.allclose(o, i, atol=1e-3):
            continue
        torch.testing.assert_close(o, i.flip(-1), atol=1e-3, rtol=0)
        flipped += 1
    assert 0 < flipped < 16


def test_crops_differ_per_sample_and_are_reproducible():
    images = _images(n=1).repeat(6, 1, 1, 1)
    a = random_resized_crop_batch(images, 12, (0.2, 0.6), False, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop_batch(images, 12, (0.2, 0.6), False, generator=torch.Generator().manual_seed(1))
    c = random_resized_crop_batch(images, 12, (0.2, 0.6), False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.unique(a.flatten(1), dim=0).shape[0] == 6


def test_crop_is_a_zoom():
    """A small central-ish crop of a horizontal ramp spans a narrower value range than the image."""
    ramp = torch.linspace(0, 255, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()
    out = random_resized_crop_batch(ramp, 32, (0.1, 0.1), False, ratio=(1.0, 1.0),
                                    generator=torch.Generator().manual_seed(0))
    span = out[..., -1] - out[..., 0]  # [8, 1, 32]
    assert (span < 0.5 * 255).all()
    assert (span > 0).all()  # still increasing left to right: no flip


def test_normalize_round_trip():
    uint8 = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    norm = Normalize([0.2, 0.5, 0.7], [0.1, 0.3, 0.2])
    x = norm(uint8)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[:, 1], (uint8[:, 1].float() / 255 - 0.5) / 0.3)
    back = norm.denormalize(x)
    torch.testing.assert_close(back * 255, uint8.float(), atol=1e-3, rtol=0)
    assert norm.denormalize(torch.full((1, 3, 1, 1), 1e3)).max() == 1.0  # clamped


def test_channel_stats():
    images = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    images[:, 1] = 255
    images[:2, 0] = 51  # 0.2
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.1, 1.0])
    assert std[1] == pytest.approx(0.0) and std[0] > 0.09


def test_resize_batch():
    images = _images(h=10, w=10)
    assert resize_batch(images, 10) is images
    assert resize_batch(images, 5).shape == (4, 3, 5, 5)


def test_pil_transforms():
    img = Image.new("RGB", (40, 30), (10, 20, 30))
    out = pil_eval_transform(16)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[0].float().mean() == pytest.approx(10, abs=1)
    out = pil_train_transform(16, (0.5, 1.0), True)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
