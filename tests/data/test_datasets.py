from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import ConfigError, DataConfig
from mimkit.data import BatchLoader, build_dataset, normalizer_for, per_class_subset
from mimkit.data.datasets import list_images
from mimkit.errors import DataError

# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.fmnist
def test_fashion_mnist_from_debian_files(fmnist_train):
    test = build_dataset(DataConfig(), "test")
    for data, n in ((fmnist_train, 60000), (test, 10000)):
        assert len(data) == n
        assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64
        assert data.files is None and data.skipped == 0
        assert len(data.classes) == 10 and data.labelled
    assert torch.equal(torch.bincount(fmnist_train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert fmnist_train.images.float().mean() > 50  # real images, not zeros
    assert not torch.equal(fmnist_train.images[:10], test.images[:10])


@pytest.mark.fmnist
def test_fashion_mnist_three_channels_repeat_grey():
    grey = build_dataset(DataConfig(), "test")
    rgb = build_dataset(DataConfig(channels=3), "test")
    assert rgb.images.shape == (10000, 3, 28, 28) and rgb.images.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(rgb.images[:, c], grey.images[:, 0])


@pytest.mark.fmnist
def test_fashion_mnist_subset(fmnist_train):
    sub = build_dataset(DataConfig(subset_fraction=0.01, subset_seed=3), "train")
    assert len(sub) == 600
    assert torch.equal(torch.bincount(sub.labels), torch.full((10,), 60))
    keep = per_class_subset(fmnist_train.labels, 0.01, 3)
    assert torch.equal(sub.images, fmnist_train.images[keep])
    # the test split is never subset
    assert len(build_dataset(DataConfig(subset_fraction=0.01), "test")) == 10000


def test_fashion_mnist_missing_root_without_download(tmp_path, monkeypatch):
    from mimkit.data import datasets

    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(ConfigError, match="Fashion-MNIST not found"):
        build_dataset(DataConfig(), "train")
    with pytest.raises(ConfigError, match="data.root: no Fashion-MNIST IDX files"):
        build_dataset(DataConfig(root=str(tmp_path)), "train")


@pytest.mark.fmnist
def test_a_given_fashion_mnist_root_is_not_replaced_by_the_default_location(tmp_path):
    """The Debian files exist, but a root that was given and lacks the data is refused, not ignored."""
    with pytest.raises(ConfigError, match=r"data.root: folder not found: .*nowhere"):
        build_dataset(DataConfig(root=str(tmp_path / "nowhere")), "train")


# ----------------------------------------------------------------------------- per_class_subset


def test_per_class_subset_counts_and_determinism():
    labels = torch.cat([torch.full((7,), 0), torch.full((13,), 1), torch.full((20,), 2)])
    labels = labels[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    idx = per_class_subset(labels, 0.3, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [math.ceil(0.3 * 7), math.ceil(0.3 * 13), math.ceil(0.3 * 20)]  # 3, 4, 6
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    assert torch.equal(per_class_subset(labels, 0.3, seed=0), idx)
    assert not torch.equal(per_class_subset(labels, 0.3, seed=1), idx)


def test_per_class_subset_at_least_one_and_unlabelled():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    counts = torch.bincount(labels[per_class_subset(labels, 0.01, 0)]).tolist()
    assert counts == [1, 1, 1]
    unlabelled = torch.full((50,), -1)
    assert per_class_subset(unlabelled, 0.1, 0).numel() == 5


# ----------------------------------------------------------------------------- image folders


def _image_folder(root: Path, write_image, counts=None) -> Path:
    counts = counts or {"train": {"cat": 3, "dog": 4}, "val": {"cat": 2, "dog": 1}}
    for split, classes in counts.items():
        for cls, n in classes.items():
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", value=40 if cls == "cat" else 210)
    return root


def test_image_folder_labels(tmp_path, write_image, data_cfg):
    root = _image_folder(tmp_path / "folder", write_image)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    train = build_dataset(data_cfg(name="imagefolder", root=str(root)), "train")
    assert train.classes == ["cat", "dog"]
    assert train.images.shape == (7, 3, 8, 8) and train.images.dtype == torch.uint8
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    means = train.images.float().mean(dim=(1, 2, 3))
    # each label sits with its own images: dark cats, bright dogs
    assert (means[train.labels == 0] < 80).all() and (means[train.labels == 1] > 170).all()
    test = build_dataset(data_cfg(name="imagefolder", root=str(root)), "test")  # falls back to val/
    assert sorted(test.labels.tolist()) == [0, 0, 1]
    assert train.labelled and train.skipped == 0


def test_image_folder_grey_conversion(tmp_path, write_image, data_cfg):
    root = _image_folder(tmp_path / "folder", write_image)
    grey = build_dataset(data_cfg(name="imagefolder", root=str(root), channels=1, img_size=6), "train")
    assert grey.images.shape == (7, 1, 6, 6)


def test_image_folder_flat_has_no_classes(tmp_path, write_image, data_cfg):
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        build_dataset(data_cfg(name="imagefolder", root=str(tmp_path / "flat")), "train")


def test_unlabelled_nested_folder(tmp_path, write_image, data_cfg):
    root = tmp_path / "unl"
    write_image(root / "a" / "b" / "x.png")
    write_image(root / "c.jpg", fmt="JPEG")
    write_image(root / "d" / "e.PNG", fmt="PNG")
    (root / "d" / "readme.md").write_text("hi")
    assert len(list_images(root)) == 3
    data = build_dataset(data_cfg(name="unlabelled", root=str(root)), "train")
    assert len(data) == 3 and data.images.shape == (3, 3, 8, 8)
    assert data.labels.tolist() == [-1, -1, -1]
    assert data.classes == [] and not data.labelled


def _tiny_imagenet(root: Path, write_image) -> Path:
    wnids = ["n09999999", "n01111111"]  # not sorted: the file's order defines the label
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, wnid in enumerate(wnids):
        for i in range(2 + k):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", value=30 + 180 * k, fmt="JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n01111111", "n09999999", "n01111111"]):
        write_image(root / "val" / "images" / f"val_{i}.JPEG", value=30 + 180 * wnids.index(wnid), fmt="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path, write_image, data_cfg):
    root = _tiny_imagenet(tmp_path / "tiny-imagenet-200", write_image)
    cfg = data_cfg(name="tiny_imagenet", root=str(root))
    train = build_dataset(cfg, "train")
    assert train.classes == ["n09999999", "n01111111"]
    assert train.labels.tolist() == [0, 0, 1, 1, 1]
    means = train.images.float().mean(dim=(1, 2, 3))
    assert (means[train.labels == 0] < 90).all() and (means[train.labels == 1] > 150).all()
    val = build_dataset(cfg, "test")
    assert val.labels.tolist() == [1, 0, 1]
    assert val.images.shape == (3, 3, 8, 8)


def test_tiny_imagenet_bad_annotation(tmp_path, write_image, data_cfg):
    root = _tiny_imagenet(tmp_path / "tin", write_image)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\n")
    with pytest.raises(ConfigError, match="val_annotations.txt:1"):
        build_dataset(data_cfg(name="tiny_imagenet", root=str(root)), "test")


# ----------------------------------------------------------------------------- damaged and missing data


def _folder_with_corrupt(root: Path, write_image) -> Path:
    for i in range(5):
        write_image(root / "train" / "a" / f"{i}.png", value=50)
    for i in range(4):
        write_image(root / "train" / "b" / f"{i}.png", value=200)
    (root / "train" / "b" / "broken.png").write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8,
                                                                     generator=torch.Generator().manual_seed(0))
                                                       .numpy().tobytes())
    return root


def test_corrupt_image_skipped_cached(tmp_path, write_image, data_cfg):
    root = _folder_with_corrupt(tmp_path / "f", write_image)
    data = build_dataset(data_cfg(name="imagefolder", root=str(root), cache="yes"), "train")
    assert data.skipped == 1
    assert len(data) == 9 and data.images.shape[0] == 9
    assert torch.bincount(data.labels).tolist() == [5, 4]
    loader = BatchLoader(data, data_cfg(), 4, train=False, normalize=normalizer_for(data, data_cfg()))
    assert loader.skipped == 1


def test_corrupt_image_skipped_streamed(tmp_path, write_image, data_cfg):
    root = _folder_with_corrupt(tmp_path / "f", write_image)
    cfg = data_cfg(name="imagefolder", root=str(root), cache="no")
    data = build_dataset(cfg, "train")
    assert data.images is None and len(data.files) == 10
    loader = BatchLoader(data, cfg, 4, train=False, normalize=normalizer_for(data, cfg))
    batches = list(loader)
    assert loader.skipped == 1
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert images.shape == (9, 3, 8, 8) and images.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [5, 4]
    # the dark class stays dark after normalisation, the bright one bright
    means = images.mean(dim=(1, 2, 3))
    assert (means[labels == 0] < means[labels == 1].min()).all()


def test_empty_folder_names_path(tmp_path, data_cfg):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(empty))):
        build_dataset(data_cfg(name="unlabelled", root=str(empty)), "train")
    with pytest.raises(ConfigError, match=re.escape(str(empty))):
        build_dataset(data_cfg(name="imagefolder", root=str(empty)), "train")
    (empty / "cls").mkdir()
    with pytest.raises(ConfigError, match=f"no images.*{re.escape(str(empty))}"):
        build_dataset(data_cfg(name="imagefolder", root=str(empty)), "train")


@pytest.mark.parametrize("name", ["imagefolder", "unlabelled", "tiny_imagenet"])
def test_missing_folder_names_path(tmp_path, data_cfg, name):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ConfigError, match=f"not found.*{re.escape(str(missing))}"):
        build_dataset(data_cfg(name=name, root=str(missing)), "train")


@pytest.mark.parametrize("name", ["imagefolder", "unlabelled", "tiny_imagenet"])
def test_folder_sources_need_root(data_cfg, name):
    with pytest.raises(ConfigError, match="data.root"):
        build_dataset(data_cfg(name=name), "train")


def test_unknown_dataset(data_cfg):
    with pytest.raises(ConfigError, match="mnist_digits.*valid"):
        build_dataset(data_cfg(name="mnist_digits"), "train")


def test_cifar10_missing_without_download(tmp_path, data_cfg):
    with pytest.raises(ConfigError, match=f"cifar10.*{re.escape(str(tmp_path))}"):
        build_dataset(data_cfg(name="cifar10", root=str(tmp_path), download=False), "train")
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, data_cfg):
    """convert("L") clips a 16-bit image at 255, so most of it came out white; it must be scaled."""
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            Image.fromarray(ramp).save(tmp_path / "f" / split / cls / "x.png")
    data = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path / "f"), channels=1, img_size=8), "train")
    got = data.images[0, 0].to(torch.float64)
    expected = torch.from_numpy(np.round(ramp / 257.0))
    assert torch.equal(got, expected), (got.max(), expected.max())
    assert int((got == 255).sum()) == 1  # only the brightest pixel is white


def test_decompression_bomb_is_skipped_and_counted(tmp_path, write_image, data_cfg, monkeypatch):
    from PIL import Image as PILImage

    write_image(tmp_path / "u" / "small.png", size=(8, 8))
    write_image(tmp_path / "u" / "bomb.png", size=(64, 64))
    # Anything over 2 x MAX_IMAGE_PIXELS raises DecompressionBombError: shrink the limit to 1000 px.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    data = build_dataset(data_cfg(name="unlabelled", root=str(tmp_path / "u"), img_size=8), "train")
    assert len(data) == 1 and data.skipped == 1


def test_truncated_idx_file_is_named(tmp_path, data_cfg):
    import gzip

    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\1" * 5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + (2).to_bytes(4, "big")
                                                                        + b"\1\2"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: 21 bytes where its header promises 24"):
        build_dataset(data_cfg(name="fashion_mnist", root=str(tmp_path), channels=1, img_size=2), "train")


# ----------------------------------------------------------------------------- own images: colour, stats, sources


def _mixed_folder(root: Path, write_image, n: int = 12, mode: str = "RGB", classes: bool = True) -> Path:
    """Images of mixed sizes and values, in two class folders (or flat)."""
    for i in range(n):
        sub = root / ("train" if classes else "") / (("a", "b")[i % 2] if classes else "")
        write_image(sub / f"{i}.png", value=40 + 15 * i, size=(10 + 3 * i, 30 - i), mode=mode)
    return root


def test_normalisation_is_the_same_in_memory_and_streamed(tmp_path, write_image, data_cfg):
    """The statistics come from the same images decoded the same way whatever ``data.cache`` says."""
    root = _folder_with_corrupt(_mixed_folder(tmp_path / "f", write_image), write_image)
    cached = build_dataset(data_cfg(name="imagefolder", root=str(root), cache="yes"), "train")
    streamed_cfg = data_cfg(name="imagefolder", root=str(root), cache="no")
    streamed = build_dataset(streamed_cfg, "train")
    assert cached.images is not None and streamed.images is None
    from mimkit.data.datasets import dataset_stats

    ours = dataset_stats(cached, data_cfg())
    torch.testing.assert_close(torch.tensor(dataset_stats(streamed, streamed_cfg)), torch.tensor(ours))
    # Every 3rd image when at most a third of them may be used, in either mode.
    few = dataset_stats(streamed, streamed_cfg, max_images=len(streamed) // 3)
    torch.testing.assert_close(torch.tensor(few), torch.tensor(dataset_stats(cached, data_cfg(),
                                                                            max_images=len(cached) // 3)))
    assert few != ours


def test_colour_images_trained_as_grey_are_warned_about(tmp_path, write_image, data_cfg, caplog):
    colour = _mixed_folder(tmp_path / "colour", write_image)
    grey = _mixed_folder(tmp_path / "grey", write_image, mode="L")
    with caplog.at_level("WARNING", logger="mimkit.data.datasets"):
        data = build_dataset(data_cfg(name="imagefolder", root=str(colour), channels=1, img_size=8), "train")
    assert data.images.shape[1] == 1
    warned = [r.getMessage() for r in caplog.records if "colour" in r.getMessage()]
    assert len(warned) == 1 and "data.channels=3" in warned[0] and "12 of 12" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mimkit.data.datasets"):
        build_dataset(data_cfg(name="imagefolder", root=str(grey), channels=1), "train")
        build_dataset(data_cfg(name="imagefolder", root=str(colour), channels=3), "train")
    assert not [r for r in caplog.records if "colour" in r.getMessage()]


def test_folder_source_reads_labels_where_there_are_class_folders(tmp_path, write_image, data_cfg):
    labelled = build_dataset(data_cfg(name="folder", root=str(_mixed_folder(tmp_path / "l", write_image))), "train")
    assert labelled.labelled and labelled.classes == ["a", "b"] and len(labelled) == 12
    flat = build_dataset(data_cfg(name="folder", root=str(_mixed_folder(tmp_path / "u", write_image,
                                                                           classes=False))), "train")
    assert not flat.labelled and len(flat) == 12 and (flat.labels == -1).all()
    with pytest.raises(DataError, match="test/ or val/"):
        build_dataset(data_cfg(name="folder", root=str(tmp_path / "u")), "test")


class _Images(torch.utils.data.Dataset):
    """Items of every kind a user may hand over: PIL, uint8 and float tensors, arrays (one of a single
    channel), pairs, None."""

    def __init__(self, n: int = 9) -> None:
        gen = torch.Generator().manual_seed(0)
        self.pixels = [torch.randint(0, 256, (3, 12 + i, 16), dtype=torch.uint8, generator=gen) for i in range(n)]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        x = self.pixels[i]
        kind = i % 5
        if kind == 0:
            return Image.fromarray(x.permute(1, 2, 0).numpy())
        if kind == 1:
            return x, 3
        if kind == 2:
            return x.float() / 255
        if kind == 3:
            return (x.permute(1, 2, 0).numpy() if i < 5 else x[:1].permute(1, 2, 0).numpy()), 1
        return None if i == 4 else x


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_any_torch_dataset_trains_in_memory_or_streamed(data_cfg, cache):
    from mimkit.data import from_torch_dataset

    cfg = data_cfg(img_size=8, cache=cache)
    data = from_torch_dataset(_Images(), cfg)
    assert data.name == "torch_dataset" and not data.labelled
    # Batches of 3 of 9 items: a training epoch drops none, so the unreadable one is always met.
    loader = BatchLoader(data, cfg, 3, train=True, normalize=normalizer_for(data, cfg))
    batches = list(loader)
    assert all(b.images.shape[1:] == (3, 8, 8) and torch.isfinite(b.images).all() for b in batches)
    assert loader.skipped == 1  # the item that was None
    assert sum(len(b.images) for b in batches) >= 6


def test_torch_dataset_refusals(data_cfg):
    from mimkit.data import from_torch_dataset
    from mimkit.data.datasets import dataset_image

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3, 8, 8)

    with pytest.raises(ConfigError, match="no len"):
        from_torch_dataset(Endless(), data_cfg())
    with pytest.raises(ConfigError, match="empty"):
        from_torch_dataset([], data_cfg())
    with pytest.raises(DataError, match=r"item 7: .*\[C, H, W\]"):
        dataset_image(torch.zeros(2, 5, 8, 8), 3, 7)
    with pytest.raises(DataError, match="item 2: expected a PIL image"):
        dataset_image("a.png", 3, 2)
    with pytest.raises(ConfigError, match="torch_dataset.*cannot rebuild"):
        build_dataset(data_cfg(name="torch_dataset"), "train")
