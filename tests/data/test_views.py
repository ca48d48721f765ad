import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mimkit.data.transforms import random_resized_crop_batch
from mimkit.data.views import (
    MultiView,
    ViewSpec,
    adjust_hue_batch,
    color_jitter_batch,
    expand_views,
    gaussian_blur_batch,
    parse_views,
    views_batch,
    views_to_config,
)
from mimkit.errors import ConfigError


def _rgb(b=6, s=12, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_hue_matches_torchvision_per_image():
    x = _rgb()
    shift = torch.linspace(-0.5, 0.5, x.shape[0])
    got = adjust_hue_batch(x, shift)
    want = torch.stack([TF.adjust_hue(img, float(h)) for img, h in zip(x, shift, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_torchvision_in_its_fixed_order(channels):
    x = _rgb()[:, :channels]
    spec = ViewSpec(jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.3, hue=0.2)
    got = color_jitter_batch(x, spec, torch.Generator().manual_seed(3))
    # The same draws, in the documented order: which images, then brightness, contrast, saturation, hue.
    g = torch.Generator().manual_seed(3)
    b = x.shape[0]
    assert bool((torch.rand(b, generator=g) < 1.0).all())
    f = {n: torch.empty(b).uniform_(1 - getattr(spec, n), 1 + getattr(spec, n), generator=g)
         for n in ("brightness", "contrast", "saturation")}
    h = torch.empty(b).uniform_(-spec.hue, spec.hue, generator=g)
    want = []
    for i, img in enumerate(x):
        img = TF.adjust_brightness(img, float(f["brightness"][i]))
        img = TF.adjust_contrast(img, float(f["contrast"][i]))
        img = TF.adjust_saturation(img, float(f["saturation"][i]))
        want.append(TF.adjust_hue(img, float(h[i])))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)


def test_color_jitter_probability_zero_is_identity():
    x = _rgb()
    assert torch.equal(color_jitter_batch(x, ViewSpec(jitter=0.0)), x)


def test_gaussian_blur_matches_torchvision_per_image():
    x = _rgb(b=4, s=16)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    got = gaussian_blur_batch(x, sigma, kernel=7)
    want = torch.stack([TF.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_only_crop_without_colour_operations():
    x = _rgb() * 255
    spec = ViewSpec(size=8, scale=(0.3, 1.0), hflip=0.5)
    got = views_batch(x, [spec], 12, torch.Generator().manual_seed(5))
    want = random_resized_crop_batch(x, 8, spec.scale, 0.5, spec.ratio, generator=torch.Generator().manual_seed(5))
    assert len(got) == 1 and torch.equal(got[0], want)


def test_solarize_and_grayscale_every_image():
    x = _rgb() * 255
    spec = ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, solarize=1.0)
    (got,) = views_batch(x, [spec], 12, torch.Generator().manual_seed(0))
    crop = random_resized_crop_batch(x, 12, (1.0, 1.0), 0.0, (1.0, 1.0), generator=torch.Generator().manual_seed(0))
    want = TF.solarize((crop / 255).clamp(0, 1), 128 / 255) * 255
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    (grey,) = views_batch(x, [ViewSpec(grayscale=1.0)], 12, torch.Generator().manual_seed(0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_views_have_their_sizes_and_counts_and_follow_the_seed():
    x = _rgb(b=5, s=28) * 255
    specs = parse_views([{"scale": [0.4, 1.0], "count": 2, "jitter": 0.8, "blur": 0.5, "solarize": 0.2},
                         {"size": 12, "scale": [0.1, 0.4], "count": 3, "grayscale": 0.2}])
    views = views_batch(x, specs, 28, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(5, 3, 28, 28)] * 2 + [(5, 3, 12, 12)] * 3
    assert all(float(v.min()) >= 0 and float(v.max()) <= 255 for v in views)
    again = views_batch(x, specs, 28, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    other = views_batch(x, specs, 28, torch.Generator().manual_seed(2))
    assert not torch.equal(views[0], other[0])
    assert not torch.equal(views[0], views[1])  # two views of one kind are drawn independently


def test_parse_views_round_trip_and_errors():
    specs = parse_views([{"size": 16, "scale": [0.1, 0.4], "count": 4}])
    assert specs == parse_views(views_to_config(specs)) and len(expand_views(specs)) == 4
    with pytest.raises(ConfigError, match=r"method.views\[0\]: unknown setting\(s\) crop; valid: size"):
        parse_views([{"crop": 1}])
    with pytest.raises(ConfigError, match=r"method.views\[1\].jitter must be a probability in \[0, 1\], got 1.5"):
        parse_views([{}, {"jitter": 1.5}])
    with pytest.raises(ConfigError, match="scale"):
        parse_views([{"scale": [0.5, 0.2]}])
    with pytest.raises(ConfigError, match="count"):
        parse_views([{"count": 0}])
    with pytest.raises(ConfigError, match="must be a list"):
        parse_views({"size": 3})
    with pytest.raises(ConfigError, match=r"method.views\[0\].scale must be \[lo, hi\], got 0.5"):
        parse_views([{"scale": 0.5}])
    with pytest.raises(ConfigError, match=r"method.views\[0\].jitter must be a number, got 'yes'"):
        parse_views([{"jitter": "yes"}])
    with pytest.raises(ConfigError, match=r"method.views\[0\].blur must be a number, got True"):
        parse_views([{"blur": True}])
    # a flip written as a boolean means half the time on both data paths
    assert parse_views([{"hflip": True}])[0].hflip == 0.5 and parse_views([{"hflip": False}])[0].hflip == 0.0


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_pil_path_draws_every_view(mode, channels):
    img = Image.fromarray((torch.rand(20, 20, channels) * 255).to(torch.uint8).squeeze(-1).numpy(), mode)
    specs = parse_views([{"count": 2, "jitter": 0.8, "grayscale": 0.2, "blur": 0.5, "solarize": 0.2},
                         {"size": 8, "scale": [0.1, 0.4], "count": 2}])
    views = MultiView(specs, 16, channels)(img)
    assert [tuple(v.shape) for v in views] == [(channels, 16, 16)] * 2 + [(channels, 8, 8)] * 2
    assert all(v.dtype == torch.uint8 for v in views)
    single = MultiView(parse_views([{}]), 16, channels)(img)
    assert isinstance(single, torch.Tensor) and single.shape == (channels, 16, 16)
