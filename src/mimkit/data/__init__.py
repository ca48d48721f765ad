"""Datasets and batch loaders."""

from mimkit.data.batch import Batch
from mimkit.data.datasets import (
    DATASETS,
    TORCH_DATASET,
    ImageSet,
    build_dataset,
    check_labelled,
    from_torch_dataset,
    per_class_subset,
)
from mimkit.data.loader import BatchLoader, normalizer_for
from mimkit.data.transforms import Normalize
from mimkit.data.views import ViewSpec, parse_views


def build_loader(data: ImageSet, cfg, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, normalize: Normalize | None = None,
                 views: list[ViewSpec] | None = None, batch_multiple: int = 1) -> BatchLoader:
    """A :class:`BatchLoader` over ``data``; normalised as ``cfg`` says (or with ``data``'s statistics) unless
    ``normalize`` is given.

    ``views`` are the training views (a method's ``views``; one default view when None);
    ``batch_multiple`` the set size of a method that mixes images (a method's ``batch_multiple``).
    """
    return BatchLoader(data, cfg, batch_size, train, normalize or normalizer_for(data, cfg),
                       seed=seed, rank=rank, world_size=world_size, views=views, batch_multiple=batch_multiple)


__all__ = ["DATASETS", "TORCH_DATASET", "Batch", "BatchLoader", "ImageSet", "Normalize", "ViewSpec", "build_dataset",
           "build_loader", "check_labelled", "from_torch_dataset", "normalizer_for", "parse_views", "per_class_subset"]
