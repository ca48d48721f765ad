"""The one structure the engine hands a method: a batch of images (one or several views of each),
with labels where there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Batch:
    """One batch, moved to a device as a whole.

    Attributes:
        images: ``[N, C, H, W]`` float32, normalised: the first (or only) view.
        labels: ``[N]`` int64 class indices (-1 where the dataset has none), or None.
        views: For a method that declares several views, all of them in its order, each
            ``[N, C, S_v, S_v]`` (``views[0]`` is ``images``); empty for a single view.

    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    views: tuple[torch.Tensor, ...] = ()

    @property
    def all_views(self) -> tuple[torch.Tensor, ...]:
        """Every view of the batch, the first being ``images``."""
        return self.views or (self.images,)

    @property
    def size(self) -> int:
        """Images in the batch (what the engine counts for throughput and schedules)."""
        return int(self.images.shape[0])

    def first(self, n: int) -> Batch:
        """The first ``n`` images of the batch, in every view."""
        labels = None if self.labels is None else self.labels[:n]
        views = tuple(v[:n] for v in self.views)
        return Batch(views[0] if views else self.images[:n], labels, views)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The same batch on ``device`` (tensors already there are not copied)."""
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        views = tuple(v.to(device, non_blocking=non_blocking) for v in self.views)
        images = views[0] if views else self.images.to(device, non_blocking=non_blocking)
        return replace(self, images=images, labels=labels, views=views)

    @classmethod
    def of(cls, batch: Batch | torch.Tensor | tuple | list) -> Batch:
        """A :class:`Batch` from a batch, a bare image tensor, or an ``(images, labels)`` pair.

        The library accepts a bare tensor (``mae(images)``) so that a method can be called by hand.
        """
        if isinstance(batch, Batch):
            return batch
        if isinstance(batch, torch.Tensor):
            return cls(batch)
        images, labels = batch
        return cls(images, labels)


def whole_sets(n: int, multiple: int, up: bool = False) -> int:
    """``n`` images cut down (or, with ``up``, rounded up) to whole sets of ``multiple``.

    A method that mixes images in pairs or groups (``batch_multiple``) trains on whole sets only:
    the loader cuts a batch that lost undecodable images, ``visualize`` and ``resources`` round the
    number of images they show or measure, and the trainer refuses a batch size that is not whole.

    Example:
        >>> whole_sets(7, 2), whole_sets(7, 2, up=True), whole_sets(8, 4)
        (6, 8, 8)

    """
    return -(-n // multiple) * multiple if up else n - n % multiple


__all__ = ["Batch", "whole_sets"]
