"""Datasets and batch loaders."""

from mimkit.data.batch import Batch
from mimkit.data.datasets import DATASETS, ImageSet, build_dataset, check_labelled, per_class_subset
from mimkit.data.loader import BatchLoader, normalizer_for
from mimkit.data.transforms import Normalize


def build_loader(data: ImageSet, cfg, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, normalize: Normalize | None = None) -> BatchLoader:
    """A :class:`BatchLoader` over ``data``; statistics from ``data`` unless ``normalize`` is given."""
    return BatchLoader(data, cfg, batch_size, train, normalize or normalizer_for(data, cfg.channels),
                       seed=seed, rank=rank, world_size=world_size)


__all__ = ["DATASETS", "Batch", "BatchLoader", "ImageSet", "Normalize", "build_dataset", "build_loader",
           "check_labelled", "normalizer_for", "per_class_subset"]
