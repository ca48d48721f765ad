"""One batch iterator for in-memory and streamed datasets, shardable across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mimkit.data.batch import Batch, whole_sets
from mimkit.data.datasets import FileDataset, ImageSet, dataset_stats
from mimkit.data.transforms import (
    Normalize,
    pil_eval_transform,
    rand_augment_batch,
    random_erasing_batch,
    resize_batch,
)
from mimkit.data.views import MultiView, ViewSpec, views_batch
from mimkit.errors import ConfigError

if TYPE_CHECKING:  # the data layer takes a DataConfig, but does not import the config module
    from mimkit.config import DataConfig


def normalizer_for(data: ImageSet | None, cfg: DataConfig) -> Normalize:
    """The normalisation ``cfg`` gives (``data.mean`` / ``data.std``), else the statistics of ``data``.

    A run stores the statistics it trained with in its ``config.yaml``, so every command that reads
    the run normalises as training did; where they are not set they are computed from an evenly
    spaced sample of ``data`` (:func:`~mimkit.data.datasets.dataset_stats`), the same whether it is
    in memory or streamed.

    Raises:
        ValueError: Neither statistics in ``cfg`` nor ``data`` to compute them from.

    """
    if cfg.mean:
        return Normalize(list(cfg.mean), list(cfg.std))
    if data is None:
        raise ValueError("normalizer_for: data.mean / data.std are not set and no data was given to compute them")
    return Normalize(*dataset_stats(data, cfg))


def _collate_skipping(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Stack the decodable samples view by view; a sample is ``(view or [views], label)`` or None."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return [], torch.empty(0, dtype=torch.long), skipped
    views = [[g[0]] if isinstance(g[0], torch.Tensor) else g[0] for g in good]
    return [torch.stack(v) for v in zip(*views, strict=True)], torch.tensor([g[1] for g in good]), skipped


class BatchLoader:
    """Yields a :class:`Batch` at a time: ``images [B, C, S, S]`` float32 normalised, ``labels [B]`` int64.

    For training, each image is drawn as the method's ``views`` say (several views fill
    ``Batch.views``); for evaluation it is only resized. In-memory data is shuffled with a generator
    seeded by ``(seed, epoch)``, sharded by rank like ``DistributedSampler`` and augmented per batch;
    streamed data goes through a ``DataLoader``. Files that fail to decode are skipped and counted
    in :attr:`skipped`.
    """

    def __init__(
        self,
        data: ImageSet,
        cfg: DataConfig,
        batch_size: int,
        train: bool,
        normalize: Normalize,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        views: Sequence[ViewSpec] | None = None,
        batch_multiple: int = 1,
    ) -> None:
        """Set up the iterator; ``train`` turns on shuffling, ``views`` (default: one view) and ``drop_last``.

        ``batch_multiple``: a batch that lost files which failed to decode is cut to a multiple of
        this (a method that mixes images in pairs or groups needs whole sets).
        """
        self.data, self.cfg, self.batch_size, self.train = data, cfg, batch_size, train
        self.batch_multiple = batch_multiple
        self.normalize, self.seed, self.rank, self.world_size = normalize, seed, rank, world_size
        self.views = list(views) if views else [ViewSpec()]
        self.randaugment = (cfg.randaugment_ops, cfg.randaugment_magnitude)
        self.epoch = 0
        self.start_batch = 0
        self.skipped = data.skipped
        self._loader: DataLoader | None = None
        if data.images is None:
            tf = (MultiView(self.views, cfg.img_size, cfg.channels, self.randaugment) if train
                  else pil_eval_transform(cfg.img_size))
            ds = FileDataset(data, tf, cfg.channels)
            if world_size > 1:
                self._sampler = DistributedSampler(ds, world_size, rank, shuffle=train, seed=seed, drop_last=train)
            else:
                self._sampler = RandomSampler(ds) if train else SequentialSampler(ds)
            self._loader = DataLoader(
                ds, batch_size=batch_size, sampler=self._sampler, num_workers=cfg.num_workers,
                collate_fn=_collate_skipping, drop_last=train, persistent_workers=cfg.num_workers > 0,
            )
        if train and len(self) == 0:  # streamed or in memory: an epoch without a batch never ends
            per_rank = f" ({len(data) // world_size} per rank)" if world_size > 1 else ""
            raise ConfigError(
                f"dataset {data.name} has {len(data)} training images{per_rank}, fewer than one batch of "
                f"optim.batch_size={batch_size}; lower optim.batch_size or add images")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the shuffle of ``epoch`` (the same on every rank, so shards do not overlap).

        Args:
            epoch: Epoch number.
            start_batch: Skip this many batches (resuming inside an epoch; in-memory data only).

        """
        self.epoch = epoch
        self.start_batch = start_batch if self._loader is None else 0
        if isinstance(getattr(self, "_sampler", None), DistributedSampler):
            self._sampler.set_epoch(epoch)
        elif isinstance(getattr(self, "_sampler", None), RandomSampler):
            self._sampler.generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)

    def _rank_indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=gen)
            per_rank = n // self.world_size
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return torch.arange(self.rank, n, self.world_size)

    def __len__(self) -> int:
        if self._loader is not None:
            return len(self._loader)
        n = len(self._rank_indices()) if not self.train else len(self.data) // self.world_size
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _batch_generator(self, b: int) -> torch.Generator:
        # One generator per batch: a run resumed mid-epoch draws exactly the same augmentation.
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, b, self.rank)) & 0x7FFFFFFF)

    def _finish(self, views: list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator) -> Batch:
        """Normalise (and for training randomly erase) each view, as one :class:`Batch`."""
        views = [self.normalize(v) for v in views]
        if self.train and self.cfg.random_erasing > 0:
            views = [random_erasing_batch(v, self.cfg.random_erasing, gen) for v in views]
        return Batch(views[0], labels, tuple(views) if len(views) > 1 else ())

    def _augment(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The method's views of an in-memory batch (``[B, C, H, W]`` uint8 values as float)."""
        views = views_batch(images, self.views, self.cfg.img_size, gen)
        if self.randaugment[0] > 0:
            views = [rand_augment_batch(v.round_().clamp_(0, 255).to(torch.uint8), *self.randaugment,
                                        generator=gen).float() for v in views]
        return views

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is not None:
            for b, (views, labels, skipped) in enumerate(self._loader):
                self.skipped += skipped
                whole = whole_sets(len(labels), self.batch_multiple)
                if views and whole:
                    yield self._finish([v[:whole] for v in views], labels[:whole], self._batch_generator(b))
            return
        idx = self._rank_indices()
        for b in range(self.start_batch, len(self)):
            gen = self._batch_generator(b)
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.data.images[sel].float()
            views = self._augment(images, gen) if self.train else [resize_batch(images, self.cfg.img_size)]
            yield self._finish(views, self.data.labels[sel], gen)
