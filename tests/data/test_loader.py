from __future__ import annotations

import pytest
import torch

from mimkit.data import Batch, BatchLoader, ImageSet, build_loader, normalizer_for
from mimkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mimkit.data.views import ViewSpec, parse_views


def _indexed_set(n: int, size: int = 8, channels: int = 1) -> ImageSet:
    """An in-memory set whose label is the sample's index, so batches tell which samples they hold."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return ImageSet("synthetic", torch.arange(n), ["x"], images=images)


def _loader(data, data_cfg, batch=8, train=True, seed=0, rank=0, world_size=1, crop_scale=(0.3, 1.0), hflip=True,
            views=None, **cfg):
    cfg = data_cfg(**{"channels": data.images.shape[1], **cfg})
    views = views or [ViewSpec(scale=tuple(crop_scale), hflip=0.5 if hflip else 0.0)]
    return BatchLoader(data, cfg, batch, train, Normalize([0.5] * cfg.channels, [0.25] * cfg.channels),
                       seed=seed, rank=rank, world_size=world_size, views=views)


def _epoch(loader, epoch, start_batch=0):
    """One epoch as ``(images, labels)`` pairs; with several views, ``images`` holds all of them, flattened."""
    loader.set_epoch(epoch, start_batch)
    return [(torch.cat([v.flatten(1) for v in b.views], 1) if b.views else b.images, b.labels) for b in loader]


def test_len_and_shapes(data_cfg):
    data = _indexed_set(50)
    train = _loader(data, data_cfg)
    assert len(train) == 6  # drop_last
    batches = _epoch(train, 0)
    assert len(batches) == 6
    for images, labels in batches:
        assert images.shape == (8, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.int64
    evaluation = _loader(data, data_cfg, train=False)
    assert len(evaluation) == 7
    batches = list(evaluation)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.size for b in batches] == [8] * 6 + [2]
    batches = [(b.images, b.labels) for b in batches]
    # evaluation keeps the order and every sample, unaugmented
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(50))
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), (data.images.float() / 255 - 0.5) / 0.25)


def test_same_seed_and_epoch_is_deterministic(data_cfg):
    data = _indexed_set(40)
    a = _epoch(_loader(data, data_cfg, seed=3), 2)
    b = _epoch(_loader(data, data_cfg, seed=3), 2)
    assert len(a) == len(b) == 5
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_epochs_and_seeds_shuffle_differently(data_cfg):
    data = _indexed_set(40)
    loader = _loader(data, data_cfg, seed=3)
    order = {e: torch.cat([y for _, y in _epoch(loader, e)]) for e in (0, 1)}
    assert not torch.equal(order[0], order[1])
    assert sorted(order[0].tolist()) == list(range(40))
    other_seed = torch.cat([y for _, y in _epoch(_loader(data, data_cfg, seed=4), 0)])
    assert not torch.equal(order[0], other_seed)


def test_augmentation_applied_in_training(data_cfg):
    data = _indexed_set(16)
    loader = _loader(data, data_cfg, batch=16)
    images, labels = _epoch(loader, 0)[0]
    plain = (data.images[labels].float() / 255 - 0.5) / 0.25
    assert not torch.allclose(images, plain, atol=1e-3)
    # no augmentation at all with a full crop and no flip
    plain_loader = _loader(data, data_cfg, batch=16, channels=1, crop_scale=[1.0, 1.0], hflip=False)
    images, labels = _epoch(plain_loader, 0)[0]
    # the aspect ratio still varies, so compare loosely: close to the image, not to another one
    err = (images - (data.images[labels].float() / 255 - 0.5) / 0.25).abs().mean()
    assert err < 0.5 * (images - images.roll(1, 0)).abs().mean()


@pytest.mark.parametrize("train", [True, False])
def test_rank_sharding(data_cfg, train):
    data = _indexed_set(48)
    shards = []
    for rank in range(2):
        loader = _loader(data, data_cfg, train=train, rank=rank, world_size=2, seed=1)
        assert len(loader) == 3
        shards.append(torch.cat([y for _, y in _epoch(loader, 5)]))
    a, b = set(shards[0].tolist()), set(shards[1].tolist())
    assert len(a) == len(shards[0]) == 24 and len(b) == 24
    assert not a & b
    assert a | b == set(range(48))


RECIPES = {"crop+flip": {}, "+randaugment+erasing": {"randaugment_ops": 2, "random_erasing": 0.5}, "views": {}}
# Two global and three local views with every colour operation (DINO's kinds of view, small).
MULTI_VIEW = parse_views([
    {"scale": [0.4, 1.0], "count": 2, "jitter": 0.8, "grayscale": 0.2, "blur": 0.5, "solarize": 0.2},
    {"size": 4, "scale": [0.1, 0.4], "count": 3, "jitter": 0.8, "blur": 0.5},
])


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_inside_epoch(data_cfg, recipe):
    data = _indexed_set(56)
    settings = {"crop_scale": [0.3, 1.0], "hflip": True, "channels": 1, **RECIPES[recipe]}
    if recipe == "views":
        settings = {"channels": 1, "views": MULTI_VIEW}
    full = _epoch(_loader(data, data_cfg, seed=7, **settings), 3)
    assert len(full) == 7
    for k in (1, 4, 6):
        resumed = _epoch(_loader(data, data_cfg, seed=7, **settings), 3, start_batch=k)
        assert len(resumed) == len(full) - k
        for (xa, ya), (xb, yb) in zip(resumed, full[k:], strict=True):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)


def test_randaugment_and_erasing_apply_in_training_only(data_cfg):
    data = _indexed_set(32)
    plain = {"crop_scale": [1.0, 1.0], "hflip": False, "channels": 1}
    base, _ = _epoch(_loader(data, data_cfg, batch=32, seed=1, **plain), 0)[0]
    for extra in ({"randaugment_ops": 2}, {"random_erasing": 1.0}):
        augmented, _ = _epoch(_loader(data, data_cfg, batch=32, seed=1, **plain, **extra), 0)[0]
        changed = (augmented != base).flatten(1).any(1).float().mean()
        assert changed > 0.5, (extra, changed)
        evaluation = [b.images for b in _loader(data, data_cfg, batch=32, train=False, **plain, **extra)]
        torch.testing.assert_close(evaluation[0], (data.images.float() / 255 - 0.5) / 0.25)


def test_eval_resizes(data_cfg):
    data = _indexed_set(4, size=12)
    loader = _loader(data, data_cfg, batch=4, train=False, channels=1, img_size=6)
    images = next(iter(loader)).images
    assert images.shape == (4, 1, 6, 6)


def test_too_small_for_a_batch(data_cfg):
    with pytest.raises(ValueError, match="fewer than one batch"):
        _loader(_indexed_set(5), data_cfg, batch=8)


def test_normalizer_for(data_cfg):
    data = _indexed_set(10, channels=3)
    norm = normalizer_for(data, data_cfg())
    x = norm(data.images)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    # Statistics a run stored are used as they are, the data's own not read at all.
    stored = normalizer_for(None, data_cfg(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    assert stored.mean.flatten().tolist() == pytest.approx([m * 255 for m in IMAGENET_MEAN])
    with pytest.raises(ValueError, match="not set"):
        normalizer_for(None, data_cfg())


def test_build_loader_uses_dataset_stats(data_cfg):
    data = _indexed_set(16)
    loader = build_loader(data, data_cfg(channels=1), 4, train=False)
    x = torch.cat([b.images for b in loader])
    assert abs(float(x.mean())) < 1e-4


def test_views_in_memory_and_from_files(data_cfg, tmp_path, write_image):
    data = _indexed_set(24, size=8, channels=3)
    (batch,) = _epoch_batches(_loader(data, data_cfg, batch=24, views=MULTI_VIEW), 0)
    assert [tuple(v.shape) for v in batch.views] == [(24, 3, 8, 8)] * 2 + [(24, 3, 4, 4)] * 3
    assert batch.images is batch.views[0] and batch.size == 24
    assert not torch.equal(batch.views[0], batch.views[1])
    moved = batch.to("cpu")
    assert len(moved.all_views) == 5 and moved.images is moved.views[0]
    # the same views from image files, through the DataLoader (torchvision's v2 transforms per image)
    for i in range(6):
        write_image(tmp_path / "imgs" / "train" / "c" / f"{i}.png", value=40 * i, size=(10, 10))
    from mimkit.data import build_dataset

    cfg = data_cfg(name="imagefolder", root=str(tmp_path / "imgs"), cache="no", img_size=8)
    files = build_dataset(cfg, "train")
    loader = BatchLoader(files, cfg, 3, True, Normalize([0.5] * 3, [0.25] * 3), views=MULTI_VIEW)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2
    assert [tuple(v.shape) for v in batches[0].views] == [(3, 3, 8, 8)] * 2 + [(3, 3, 4, 4)] * 3
    # a single view leaves Batch.views empty
    (single,) = _epoch_batches(_loader(data, data_cfg, batch=24), 0)
    assert single.views == () and single.all_views == (single.images,)


def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)
