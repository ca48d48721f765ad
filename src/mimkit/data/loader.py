"""One batch iterator for in-memory and streamed datasets, shardable across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mimkit.data.batch import Batch
from mimkit.data.datasets import FileDataset, ImageSet
from mimkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    channel_stats,
    pil_eval_transform,
    pil_train_transform,
    rand_augment_batch,
    random_erasing_batch,
    random_resized_crop_batch,
    resize_batch,
)
from mimkit.errors import ConfigError

if TYPE_CHECKING:  # the data layer takes a DataConfig, but does not import the config module
    from mimkit.config import DataConfig


def normalizer_for(data: ImageSet, channels: int) -> Normalize:
    """Per-channel statistics of an in-memory dataset, else ImageNet's (grey: their average)."""
    if data.images is not None:
        return Normalize(*channel_stats(data.images))
    if channels == 1:
        return Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
    return Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))


def _collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped


class BatchLoader:
    """Yields a :class:`Batch` at a time: ``images [B, C, S, S]`` float32 normalised, ``labels [B]`` int64.

    In-memory data is shuffled with a generator seeded by ``(seed, epoch)``, sharded by rank like
    ``DistributedSampler`` and augmented per batch; streamed data goes through a ``DataLoader``.
    Files that fail to decode are skipped and counted in :attr:`skipped`.
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
    ) -> None:
        """Set up the iterator; ``train`` turns on shuffling, augmentation and ``drop_last``."""
        self.data, self.cfg, self.batch_size, self.train = data, cfg, batch_size, train
        self.normalize, self.seed, self.rank, self.world_size = normalize, seed, rank, world_size
        self.epoch = 0
        self.start_batch = 0
        self.skipped = data.skipped
        self._loader: DataLoader | None = None
        if data.images is None:
            tf = (pil_train_transform(cfg.img_size, tuple(cfg.crop_scale), cfg.hflip,
                                      (cfg.randaugment_ops, cfg.randaugment_magnitude)) if train
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

    def _erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_erasing_batch(x, self.cfg.random_erasing, gen) if self.train else x

    def __iter__(self) -> Iterator[Batch]:
        size = self.cfg.img_size
        if self._loader is not None:
            for b, (images, labels, skipped) in enumerate(self._loader):
                self.skipped += skipped
                if images.numel():
                    yield Batch(self._erase(self.normalize(images), self._batch_generator(b)), labels)
            return
        idx = self._rank_indices()
        for b in range(self.start_batch, len(self)):
            gen = self._batch_generator(b)
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.data.images[sel].float()
            if self.train:
                images = random_resized_crop_batch(
                    images, size, tuple(self.cfg.crop_scale), self.cfg.hflip, generator=gen
                )
                if self.cfg.randaugment_ops > 0:
                    as_uint8 = images.round_().clamp_(0, 255).to(torch.uint8)
                    images = rand_augment_batch(as_uint8, self.cfg.randaugment_ops, self.cfg.randaugment_magnitude,
                                                generator=gen).float()
            else:
                images = resize_batch(images, size)
            yield Batch(self._erase(self.normalize(images), gen), self.data.labels[sel])
