from __future__ import annotations

import pytest
import torch
from PIL import Image

from mimkit.data.transforms import (
    Normalize,
    channel_stats,
    pil_eval_transform,
    rand_augment_batch,
    random_erasing_batch,
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


def _torchvision_candidates(x, magnitude=9, num_bins=31):
    """Every result torchvision's ``v2.RandAugment`` can give for one image and one operation."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=1, magnitude=magnitude, num_magnitude_bins=num_bins)
    out = []
    for name, (strengths, signed) in ra._AUGMENTATION_SPACE.items():
        levels = strengths(num_bins, x.shape[-2], x.shape[-1])
        m = float(levels[magnitude]) if levels is not None else 0.0
        for value in (m, -m) if signed else (m,):
            out.append(ra._apply_image_or_video_transform(x, name, value, interpolation=ra.interpolation,
                                                          fill=ra._fill))
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_gives_each_image_what_torchvision_gives_it(channels):
    """Batched by operation, yet per image: every output is one of torchvision's RandAugment results
    for that image alone (so nothing crosses between images, and the table and strengths are its)."""
    images = _images(n=32, c=channels, h=16, w=16).to(torch.uint8)
    out = rand_augment_batch(images, 1, 9, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(len(images)):
        assert any(torch.equal(out[i], c) for c in _torchvision_candidates(images[i])), i
    assert (out != images).flatten(1).any(1).float().mean() > 0.5
    twice = rand_augment_batch(images[:6], 2, 9, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        firsts = _torchvision_candidates(images[i])
        assert any(torch.equal(twice[i], c) for f in firsts for c in _torchvision_candidates(f)), i


def test_rand_augment_is_reproducible_and_refuses_float():
    images = _images(n=16).to(torch.uint8)
    a = rand_augment_batch(images, 2, 9, generator=torch.Generator().manual_seed(3))
    b = rand_augment_batch(images, 2, 9, generator=torch.Generator().manual_seed(3))
    c = rand_augment_batch(images, 2, 9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TypeError, match="uint8"):
        rand_augment_batch(images.float(), 2, 9)


def test_random_erasing_erases_one_box_and_leaves_the_global_rng():
    x = torch.randn(32, 3, 16, 16)
    assert random_erasing_batch(x, 0.0) is x
    state = torch.get_rng_state()
    out = random_erasing_batch(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    again = random_erasing_batch(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    for o, i in zip(out, x, strict=True):
        rows, cols = (o != i).any(0).nonzero(as_tuple=True)
        assert len(rows), "p=1 erases every image"
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(rows) == box, "one rectangle"
