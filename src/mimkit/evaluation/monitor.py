"""kNN accuracy while a run pre-trains (``train.eval_every``), so a curve shows whether it learns.

The weighted kNN classifier of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018 (as DINO evaluates), on a small labelled bank, as solo-learn and lightly
monitor their runs: a per-class fraction of the train split is the bank, the same fraction of the
test split the queries, both normalised with the whole train split's statistics (as
:func:`~mimkit.evaluation.features.dataset_features` does after the run).
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.config import DataConfig
from mimkit.data import build_loader
from mimkit.evaluation.features import extract_features, labelled_splits
from mimkit.evaluation.knn import knn_accuracy


class KnnMonitor:
    """The kNN k=20 of an encoder on a fixed small labelled bank and query set, built once per run."""

    def __init__(self, cfg: DataConfig, fraction: float, device: torch.device, precision: str,
                 batch_size: int = 512) -> None:
        """Load both splits of ``cfg``'s dataset and keep a per-class ``fraction`` of each.

        Args:
            cfg: The run's data section (its ``subset_fraction`` does not apply).
            fraction: Per-class fraction of the train split (the bank) and of the test split (queries).
            device: Where the encoder runs.
            precision: ``bf16``, ``fp16`` or ``fp32`` autocast for the forward passes (resolved).
            batch_size: Images per forward pass.

        Raises:
            DataError: The dataset has no labels (an unlabelled folder), one class, or a test split
                with other classes than the train split.

        """
        train, test, norm = labelled_splits(cfg, "train.eval_every (kNN while pre-training; 0 turns it off)")
        self.loaders = [build_loader(data.per_class_fraction(fraction), cfg, batch_size, train=False, normalize=norm)
                        for data in (train, test)]
        self.num_classes = len(train.classes)
        self.device, self.precision = device, precision

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """The kNN k=20 accuracy (%) of ``encoder``'s pooled features; the encoder is left in eval mode.

        Args:
            encoder: A backbone with ``forward_features`` / ``forward_head`` (a method's ``eval_module``).

        Returns:
            ``{"knn20": accuracy in percent, "knn_bank": bank images, "knn_queries": query images}``.

        """
        (bank_x, bank_y), (query_x, query_y) = (
            extract_features(encoder, loader, self.device, self.precision, progress=False) for loader in self.loaders)
        acc = knn_accuracy(bank_x, bank_y, query_x, query_y, ks=(20,), num_classes=self.num_classes)
        return {"knn20": acc[20], "knn_bank": len(bank_y), "knn_queries": len(query_y)}


__all__ = ["KnnMonitor"]
