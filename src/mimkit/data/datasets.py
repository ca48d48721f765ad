"""Image sources: Fashion-MNIST, CIFAR, STL-10, image folders (labelled or not), Tiny-ImageNet, and
any torch ``Dataset`` of images given from Python.

Small datasets are decoded once into a ``uint8`` tensor so that, on a CPU, the time goes to the
model rather than to PIL; large ones are streamed from disk. Either way a corrupt or unreadable
file is skipped, warned about and counted (``ImageSet.skipped``), never a crash mid-epoch.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from mimkit.data.transforms import channel_stats, moments
from mimkit.errors import ConfigError, DataError

if TYPE_CHECKING:  # the data layer takes a DataConfig, but does not import the config module
    from mimkit.config import DataConfig

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Decode into memory when the decoded tensor stays below this many bytes (cache=auto).
CACHE_LIMIT_BYTES = 4 * 1024**3
#: The normalisation is computed from an evenly spaced sample of at most this many training images.
STATS_IMAGES = 10000
#: ``data.name`` of a run trained from a torch ``Dataset`` passed from Python (not rebuilt from settings).
TORCH_DATASET = "torch_dataset"


@dataclass
class ImageSet:
    """A split of a dataset, either decoded in memory or streamed from files or a torch ``Dataset``.

    Attributes:
        name: Dataset name.
        labels: ``[N]`` int64 class indices, -1 where there is no label.
        classes: Class names (empty when unlabelled).
        images: ``[N, C, H, W]`` uint8 when decoded in memory, else None.
        files: Image paths when streamed from files, else None.
        items: A torch ``Dataset`` of images when streamed from one, else None.
        skipped: Files that could not be decoded (counted, warned about, left out).

    """

    name: str
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    items: Dataset | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        """Whether every sample has a class label."""
        return bool(self.classes) and bool((self.labels >= 0).all())

    def take(self, keep: torch.Tensor) -> ImageSet:
        """The samples at indices ``keep`` ``[K]`` (labels, images or files alike), as a new set."""
        return dataclasses.replace(self, labels=self.labels[keep],
                                   images=None if self.images is None else self.images[keep],
                                   files=None if self.files is None else [self.files[i] for i in keep.tolist()],
                                   items=None if self.items is None else Subset(self.items, keep.tolist()))

    def open(self, i: int, channels: int) -> Image.Image | None:
        """Decode sample ``i`` of a streamed set (a file, or an item of a torch ``Dataset``); None if unreadable."""
        if self.files is not None:
            return open_image(self.files[i], channels)
        if self.items is None:
            raise ValueError(f"dataset {self.name} is decoded in memory: index its images instead")
        return dataset_image(self.items[i], channels, i)

    def per_class_fraction(self, fraction: float, seed: int = 0) -> ImageSet:
        """A deterministic ``fraction`` of each class (:func:`per_class_subset`); the set itself at 1."""
        return self if fraction >= 1.0 else self.take(per_class_subset(self.labels, fraction, seed))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzipped or not.

    Raises:
        DataError: A truncated or corrupt file (a damaged archive, a short download), named.

    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err}); the file is truncated or corrupt, so reinstall "
                        "or re-download it") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes where its header promises {expected}; the file is "
                        "truncated or corrupt, so reinstall or re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "raw" / f"{stem}.gz", folder / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(cfg: DataConfig, split: str) -> ImageSet:
    """Fashion-MNIST (Xiao et al., 2017): the Debian package's files, ``data.root``, or a download.

    Looks in ``data.root`` (also its ``FashionMNIST/raw`` sub-folder, torchvision's layout) when it
    is given, else in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``);
    downloads with torchvision when ``data.download`` is true. A given root that lacks the files is
    refused rather than read from the default location.
    """
    prefix = "train" if split == "train" else "t10k"
    folders = [Path(cfg.root), Path(cfg.root) / "FashionMNIST"] if cfg.root else [DEBIAN_FASHION_MNIST]
    for folder in folders:
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)  # [N, 1, 28, 28]
            y = torch.from_numpy(_read_idx(labels).astype(np.int64))
            if len(x) != len(y) or x.dim() != 4:
                raise DataError(f"{images} holds {len(x)} images of shape {tuple(x.shape[1:])} but {labels} "
                                f"holds {len(y)} labels; one of them is from another dataset or damaged")
            return ImageSet("fashion_mnist", y, list(FASHION_MNIST_CLASSES), images=x)
    if cfg.download:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(cfg.root or "data", train=split == "train", download=True)
        return ImageSet("fashion_mnist", ds.targets.long(), list(FASHION_MNIST_CLASSES), images=ds.data.unsqueeze(1))
    searched = ", ".join(str(f) for f in folders)
    if cfg.root:
        # A root that was given is where the data must be: another copy elsewhere is not what was asked for.
        where = "folder not found" if not Path(cfg.root).is_dir() else "no Fashion-MNIST IDX files"
        raise ConfigError(
            f"data.root: {where}: {cfg.root} (searched {searched} for {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]); leave data.root empty for the default location "
            f"{DEBIAN_FASHION_MNIST}, or set data.download=true to download there")
    raise ConfigError(
        f"Fashion-MNIST not found (searched {searched}); install the Debian package "
        "dataset-fashion-mnist, point data.root at the IDX files, or set data.download=true"
    )


def _torchvision_set(cfg: DataConfig, split: str) -> ImageSet:
    from torchvision import datasets

    root = cfg.root or "data"
    try:
        if cfg.name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
            ds = cls(root, train=split == "train", download=cfg.download)
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return ImageSet(cfg.name, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes), images=x)
        stl_split = {"train": "train", "test": "test", "unlabelled": "unlabeled"}[split]
        ds = datasets.STL10(root, split=stl_split, download=cfg.download)
        y = torch.as_tensor(ds.labels, dtype=torch.long)
        return ImageSet("stl10", y, list(ds.classes), images=torch.from_numpy(ds.data))
    except RuntimeError as err:
        raise DataError(
            f"{cfg.name} not found under {root!r} ({err}); set data.root or data.download=true"
        ) from None
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise DataError(f"{cfg.name} under {root!r} cannot be read ({type(err).__name__}: {err}); the files "
                        "are truncated or corrupt, so delete them and download again") from None


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder``, recursively, in a stable sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{what}: folder not found: {path}")
    return path


HELD_OUT_SPLITS = ("test", "val")


def _image_folder(cfg: DataConfig, split: str) -> tuple[list[Path], list[int], list[str]]:
    root = _require_dir(Path(cfg.root), "data.root")
    if split == "train":
        split_dir = root / "train" if (root / "train").is_dir() else root
    else:
        # A held-out split must exist: the root itself would be evaluated as its own test set.
        names = list(dict.fromkeys((split, *HELD_OUT_SPLITS)))
        found = [root / s for s in names if (root / s).is_dir()]
        if not found:
            raise DataError(f"data.root {root} has no {' or '.join(n + '/' for n in names)} folder: evaluation "
                            "needs held-out images as root/val/<class>/* or root/test/<class>/*")
        split_dir = found[0]
    # Without a train/ folder the classes sit beside the held-out splits, which are not classes.
    classes = sorted(d.name for d in split_dir.iterdir()
                     if d.is_dir() and not (split_dir == root and d.name in HELD_OUT_SPLITS))
    if not classes:
        raise ConfigError(f"data.root {split_dir}: no class sub-folders (use data.name=unlabelled for a flat folder)")
    files, labels = [], []
    for idx, name in enumerate(classes):
        found = list_images(split_dir / name)
        files += found
        labels += [idx] * len(found)
    return files, labels, classes


def _tiny_imagenet(cfg: DataConfig, split: str) -> tuple[list[Path], list[int], list[str]]:
    root = _require_dir(Path(cfg.root), "data.root")
    wnids_file = root / "wnids.txt"
    train_dir = _require_dir(root / "train", "Tiny-ImageNet")
    classes = (
        wnids_file.read_text().split() if wnids_file.is_file()
        else sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    )
    index = {w: i for i, w in enumerate(classes)}
    if split == "train":
        files, labels = [], []
        for wnid in classes:
            found = list_images(train_dir / wnid)
            files += found
            labels += [index[wnid]] * len(found)
        return files, labels, classes
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise ConfigError(f"Tiny-ImageNet: {ann} not found (needed for the validation labels)")
    files, labels = [], []
    for line_no, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ConfigError(f"{ann}:{line_no}: expected 'file<TAB>wnid' with a wnid from wnids.txt")
        files.append(root / "val" / "images" / parts[0])
        labels.append(index[parts[1]])
    return files, labels, classes


def _unlabelled(cfg: DataConfig, split: str) -> tuple[list[Path], list[int], list[str]]:
    root = _require_dir(Path(cfg.root), "data.root")
    files = list_images(root)
    return files, [-1] * len(files), []


def _any_folder(cfg: DataConfig, split: str) -> tuple[list[Path], list[int], list[str]]:
    """A folder as it is: labelled (``imagefolder``) where it has class sub-folders, else unlabelled."""
    root = _require_dir(Path(cfg.root), "data.root")
    if split != "train":
        return _image_folder(cfg, split)  # evaluation needs held-out labelled images: refused there if none
    train = root / "train" if (root / "train").is_dir() else root
    if any(d.is_dir() and not (train == root and d.name in HELD_OUT_SPLITS) for d in train.iterdir()):
        return _image_folder(cfg, split)
    # Flat: every image of the training folder, none of the held-out ones beside it.
    files = [f for f in list_images(train) if train != root or f.relative_to(root).parts[0] not in HELD_OUT_SPLITS]
    return files, [-1] * len(files), []


#: Images sampled to tell a colour folder from a grey one.
COLOUR_SAMPLE = 16


def _is_colour(img: Image.Image | None) -> bool:
    """Whether an RGB image's channels differ anywhere (a grey image saved as RGB has equal ones)."""
    if img is None:
        return False
    arr = np.asarray(img.resize((32, 32)), dtype=np.int16)
    return arr.ndim == 3 and int(np.abs(arr - arr[..., :1]).max()) > 2


def warn_if_colour(data: ImageSet, cfg: DataConfig, where: str) -> int:
    """Warn when colour images are about to be trained as greyscale (``data.channels=1``), saying how not to.

    Looks at :data:`COLOUR_SAMPLE` evenly spaced images of a streamed set (files or dataset items),
    or of the set before decoding. Returns how many of them are in colour (0 when ``channels`` is 3).
    """
    if cfg.channels != 1 or not len(data) or data.images is not None:
        return 0
    step = max(1, len(data) // COLOUR_SAMPLE)
    sample = list(range(0, len(data), step))[:COLOUR_SAMPLE]
    colour = sum(_is_colour(data.open(i, 3)) for i in sample)
    if colour:
        log.warning("%s: %d of %d sampled images are in colour, but data.channels=1 trains on them as greyscale at "
                    "%d px; set data.channels=3 (and data.img_size) to keep the colour, or use a packaged colour "
                    "config (mae_vits_rgb64, cvt_mae_cvt13_rgb64, ...)", where, colour, len(sample), cfg.img_size)
    return colour


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer) grey image to 8 bits; ``convert("L")`` would clip at 255."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return img
    arr = np.asarray(img).astype(np.float64)
    # PNG and TIFF "I" images come from 16-bit files; values above 65535 mean a 32-bit range.
    top = 65535.0 if arr.size == 0 or arr.max() <= 65535 else float(2**32 - 1)
    return Image.fromarray(np.round(arr * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")


def open_image(path: Path, channels: int) -> Image.Image | None:
    """Decode one image file to RGB or L (16-bit images scaled, not clipped); None if it cannot be read.

    Unreadable files, truncated ones and decompression bombs (more pixels than PIL's
    ``MAX_IMAGE_PIXELS`` allows) are warned about and skipped; the caller counts them.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _to_8bit(img).convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


def _resize_center(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_files(
    files: list[Path], labels: list[int], size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode image files into one uint8 tensor, resized (shorter side) and centre-cropped to ``size``.

    Returns:
        ``(images [M, C, size, size] uint8, labels [M], skipped)`` with unreadable files left out.

    """
    return _decode([lambda path=path: open_image(path, channels) for path in files], labels, size, channels)


def _decode(openers: list[Any], labels: list[int], size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode each ``opener()`` (a PIL image, or None when unreadable) as :func:`decode_files` does."""
    out = torch.empty(len(openers), channels, size, size, dtype=torch.uint8)
    keep: list[int] = []
    for i, opener in enumerate(openers):
        img = opener()
        if img is None:
            continue
        arr = np.array(_resize_center(img, size), dtype=np.uint8)  # a writable copy for torch
        out[len(keep)] = torch.from_numpy(arr.reshape(size, size, channels)).permute(2, 0, 1)
        keep.append(i)
    y = torch.as_tensor([labels[i] for i in keep], dtype=torch.long)
    return out[: len(keep)], y, len(openers) - len(keep)


def dataset_image(item: Any, channels: int, index: int = -1) -> Image.Image | None:
    """One item of a torch ``Dataset`` as a PIL image of ``channels`` (``L`` or ``RGB``).

    An item is an image or a tuple whose first element is one (``(image, label)``, as torchvision's
    datasets return). An image is a PIL image, a ``[C, H, W]`` tensor (uint8, or float in [0, 1]) or
    an ``[H, W, C]`` / ``[H, W]`` uint8 NumPy array. None (an item the dataset could not read) is
    passed on, to be skipped and counted.

    Raises:
        DataError: An item of another type or shape, named with its index.

    """
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if item is None:
        return None
    if isinstance(item, torch.Tensor):
        if item.dim() == 2:
            item = item.unsqueeze(0)
        if item.dim() != 3 or item.shape[0] not in (1, 3, 4):
            raise DataError(f"dataset item {index}: a tensor image must be [C, H, W] with C in 1, 3, 4, got "
                            f"{tuple(item.shape)}")
        if item.is_floating_point():
            item = (item.float().clamp(0, 1) * 255).round().to(torch.uint8)
        item = item.to(torch.uint8).permute(1, 2, 0).squeeze(-1).cpu().numpy()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise DataError(f"dataset item {index}: a NumPy image must be uint8 [H, W] or [H, W, C] with C in 1, 3, "
                            f"4, got {item.dtype} {item.shape}")
        item = Image.fromarray(np.ascontiguousarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item))
    if not isinstance(item, Image.Image):
        raise DataError(f"dataset item {index}: expected a PIL image, a [C, H, W] tensor or an [H, W, C] uint8 "
                        f"array (alone or first in a tuple), got {type(item).__name__}")
    return _to_8bit(item).convert("L" if channels == 1 else "RGB")


def dataset_stats(data: ImageSet, cfg: DataConfig, max_images: int = STATS_IMAGES) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` in [0, 1] units of an evenly spaced sample of ``data``.

    The sample is every ``len // max_images``-th image. In memory it is read from the decoded
    images; streamed, the same images are decoded from their files (or dataset items) at
    ``data.img_size`` as they would be in memory, so the statistics do not depend on ``data.cache``.
    """
    if data.images is not None:
        mean, std = channel_stats(data.images, max_images)
    else:
        step = max(1, len(data) // max_images)
        picked = list(range(0, len(data), step))
        log.info("normalisation: per-channel statistics of %d evenly spaced images of %s", len(picked), data.name)

        def decoded() -> Iterator[torch.Tensor]:  # a batch at a time, never the whole sample in memory
            for start in range(0, len(picked), 256):
                part = picked[start : start + 256]
                images, _, _ = _decode([lambda i=i: data.open(i, cfg.channels) for i in part], [0] * len(part),
                                       cfg.img_size, cfg.channels)
                if len(images):
                    yield images

        try:
            mean, std = moments(decoded())
        except ValueError:
            raise DataError(f"dataset {data.name}: none of the {len(picked)} images sampled for the normalisation "
                            "could be decoded; check the images under data.root") from None
    # A channel of one value (a constant-colour folder) would divide by zero; 1/255 is one grey level.
    return mean, [max(s, 1 / 255) for s in std]


def per_class_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Deterministic subset: ``ceil(fraction * n_c)`` samples of each class ``c`` (or of all, if unlabelled).

    Returns:
        Sorted int64 indices into ``labels``.

    """
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).squeeze(1)
        take = max(1, math.ceil(fraction * idx.numel()))
        picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:take]])
    return torch.cat(picked).sort().values


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R BT.601 luma, as PIL's convert("L").
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def check_labelled(train: ImageSet, test: ImageSet, what: str) -> None:
    """Refuse splits that cannot score a classifier: unlabelled, one class, or other classes held out.

    Args:
        train: The labelled training split (kNN bank, probe or fine-tuning set).
        test: The held-out split.
        what: Who needs the labels, for the message (``"fine-tuning"``).

    Raises:
        DataError: Naming the dataset and the classes.

    """
    name = train.name
    if not (train.labelled and test.labelled):
        raise DataError(f"dataset {name} has no labels; {what} needs a labelled dataset "
                        "(e.g. data.name=imagefolder with root/train/<class>/* and root/val/<class>/*)")
    if len(train.classes) < 2:
        raise DataError(f"dataset {name} has {len(train.classes)} class ({', '.join(train.classes)}); {what} "
                        "needs at least 2, or every prediction is right")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(f"dataset {name}: the train and held-out splits have different classes (only in "
                        f"train: {only_train or 'none'}; only held out: {only_test or 'none'}); labels would not "
                        "match")


FILE_SOURCES = {"imagefolder": _image_folder, "tiny_imagenet": _tiny_imagenet, "unlabelled": _unlabelled,
                "folder": _any_folder}
DATASETS = ["fashion_mnist", "cifar10", "cifar100", "stl10", *FILE_SOURCES, TORCH_DATASET]


def build_dataset(cfg: DataConfig, split: str = "train") -> ImageSet:
    """Load one split of the configured dataset.

    Args:
        cfg: The data section of the config.
        split: ``train`` or ``test`` (``val`` for folders that have one); ``unlabelled`` for STL-10.

    Returns:
        An :class:`ImageSet`, in memory when small enough (``data.cache``), else streamed.

    Raises:
        ConfigError: Unknown dataset, missing folder or file, or an empty dataset.

    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name {cfg.name!r} is unknown; valid: {', '.join(DATASETS)}")
    if cfg.name == TORCH_DATASET:
        raise ConfigError(f"data.name={TORCH_DATASET}: this run was trained on a torch Dataset given from Python "
                          "(mimkit.pretrain(cfg, dataset=...)), which its settings cannot rebuild; evaluate it on a "
                          "dataset named by its settings (data.name=imagefolder data.root=...) or from Python")
    if cfg.name in FILE_SOURCES and not cfg.root:
        raise ConfigError(f"data.name={cfg.name} needs data.root (the dataset folder)")
    if cfg.name == "fashion_mnist":
        data = load_fashion_mnist(cfg, split)
    elif cfg.name in ("cifar10", "cifar100", "stl10"):
        data = _torchvision_set(cfg, split)
    else:
        files, labels, classes = FILE_SOURCES[cfg.name](cfg, split)
        if not files:
            raise ConfigError(f"no images found for data.name={cfg.name} split={split} under {cfg.root}")
        if split == "train":
            warn_if_colour(ImageSet(cfg.name, torch.zeros(len(files)), files=files), cfg, f"data.root {cfg.root}")
        approx = len(files) * cfg.channels * cfg.img_size**2
        if cfg.cache == "yes" or (cfg.cache == "auto" and approx < CACHE_LIMIT_BYTES):
            x, y, skipped = decode_files(files, labels, cfg.img_size, cfg.channels)
            if skipped:
                log.warning("%d of %d images in %s could not be decoded and were skipped",
                            skipped, len(files), cfg.root)
            data = ImageSet(cfg.name, y, classes, images=x, skipped=skipped)
        else:
            data = ImageSet(cfg.name, torch.as_tensor(labels, dtype=torch.long), classes, files=files)
    if data.images is not None:
        data.images = _match_channels(data.images, cfg.channels)
    if split == "train":
        data = data.per_class_fraction(cfg.subset_fraction, cfg.subset_seed)
    if len(data) == 0:
        raise ConfigError(f"dataset {cfg.name} split {split} is empty (root {cfg.root or 'default'})")
    return data


def from_torch_dataset(dataset: Dataset, cfg: DataConfig) -> ImageSet:
    """A map-style torch ``Dataset`` of images as a training set, unlabelled (pre-training needs no labels).

    Each item is read by :func:`dataset_image`. Decoded once into memory when small enough
    (``data.cache``, as files are), else streamed item by item; so give the dataset without random
    transforms: the method's views augment. ``data.subset_fraction`` applies as to any training set.

    Raises:
        ConfigError: A dataset without ``len()`` (an ``IterableDataset`` can be neither shuffled
            nor resumed) or an empty one.

    """
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError(f"the dataset ({type(dataset).__name__}) has no len(): give a map-style torch Dataset "
                          "(__getitem__ and __len__); an IterableDataset can be neither shuffled nor resumed") from None
    if n == 0:
        raise ConfigError(f"the dataset ({type(dataset).__name__}) is empty")
    data = ImageSet(TORCH_DATASET, torch.full((n,), -1, dtype=torch.long), items=dataset)
    warn_if_colour(data, cfg, f"the dataset ({type(dataset).__name__})")
    if cfg.cache == "yes" or (cfg.cache == "auto" and n * cfg.channels * cfg.img_size**2 < CACHE_LIMIT_BYTES):
        x, y, skipped = _decode([lambda i=i: data.open(i, cfg.channels) for i in range(n)], [-1] * n,
                                cfg.img_size, cfg.channels)
        if skipped:
            log.warning("%d of %d dataset items could not be decoded and were skipped", skipped, n)
        data = ImageSet(TORCH_DATASET, y, images=x, skipped=skipped)
    data = data.per_class_fraction(cfg.subset_fraction, cfg.subset_seed)
    if len(data) == 0:
        raise ConfigError(f"none of the {n} items of the dataset ({type(dataset).__name__}) could be decoded")
    return data


class FileDataset(Dataset):
    """Streams an :class:`ImageSet` from its files or dataset items; unreadable ones yield None (dropped in collate)."""

    def __init__(self, data: ImageSet, transform: object, channels: int) -> None:
        """Wrap a streamed ``data`` with a PIL -> uint8 tensor ``transform``."""
        assert data.files is not None or data.items is not None
        self.data, self.labels, self.transform, self.channels = data, data.labels, transform, channels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        img = self.data.open(i, self.channels)
        if img is None:
            return None
        return self.transform(img), int(self.labels[i])
