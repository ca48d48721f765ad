"""The one feature-extraction path every evaluation shares, with an on-disk cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mimkit.config import DataConfig
from mimkit.data import Batch, ImageSet, Normalize, build_dataset, build_loader, check_labelled, normalizer_for
from mimkit.engine.precision import autocast
from mimkit.engine.run_folder import check_room

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encoder: nn.Module | None,
    loader: object,
    device: torch.device,
    precision: str = "auto",
    progress: bool = True,
    blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen encoder (in eval mode), or flattened pixels if ``encoder`` is None.

    Args:
        encoder: A backbone with ``forward_features``/``forward_head``; None for raw pixels.
        loader: Yields :class:`~mimkit.data.Batch` es or ``(images [B, C, H, W], labels [B])`` pairs
            (no augmentation).
        device: Where to run the encoder.
        precision: ``bf16`` or ``fp32`` autocast for the forward pass.
        progress: Show a progress bar.
        blocks: 1 = the final pooled features; N > 1 = the pooled outputs of the last N blocks (of
            the last stage for a hierarchical backbone) concatenated, as DINO's linear evaluation of
            ViT-S does: ``forward_last_blocks`` gives each in ``forward_features``' layout, through
            the final norm, for ``forward_head`` to pool.

    Returns:
        ``(features [N, D * blocks] float32 on CPU, labels [N] int64)``.

    """
    if encoder is not None:
        # Frozen means eval mode: BatchNorm statistics and dropout must not move.
        encoder.eval().to(device)
    feats, labels = [], []
    for item in tqdm(loader, desc="features", disable=not progress, leave=False):
        batch = Batch.of(item)
        images, y = batch.images, batch.labels
        if encoder is None:
            f = images.flatten(1)
        else:
            with autocast(device, precision):
                if blocks == 1:
                    f = encoder.forward_head(encoder.forward_features(images.to(device)), pre_logits=True)
                else:
                    outs = encoder.forward_last_blocks(images.to(device), blocks)
                    f = torch.cat([encoder.forward_head(t, pre_logits=True) for t in outs], dim=-1)
        feats.append(f.float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


_CACHE_KEYS = {"train_x", "train_y", "test_x", "test_y", "num_classes"}


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached features, or None (with a warning) when the file is damaged and must be rebuilt."""
    try:
        cached = torch.load(path, weights_only=True)
        if not isinstance(cached, dict) or set(cached) != _CACHE_KEYS:
            raise ValueError(f"keys {sorted(cached) if isinstance(cached, dict) else type(cached).__name__}")
        if len(cached["train_x"]) != len(cached["train_y"]) or len(cached["test_x"]) != len(cached["test_y"]):
            raise ValueError("feature and label counts differ")
        return cached
    except Exception as err:  # torch.load raises many types for a damaged file
        log.warning("feature cache %s is unreadable (%s); extracting again", path, err)
        return None


def _cache_key(tag: str, cfg: DataConfig, split: str, precision: str) -> str:
    blob = json.dumps([tag, dataclasses.asdict(cfg), split, precision], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def labelled_splits(cfg: DataConfig, what: str) -> tuple[ImageSet, ImageSet, Normalize]:
    """The whole train and test splits of the labelled dataset in ``cfg``, and their normalisation.

    The normalisation is the one ``cfg`` stores (a run's: what it trained with), else the train
    split's statistics. The pre-training ``subset_fraction`` does not apply. ``what`` names who needs the labels in the
    refusal of an unlabelled or mismatched dataset (:func:`~mimkit.data.check_labelled`).
    """
    cfg = dataclasses.replace(cfg, subset_fraction=1.0)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    check_labelled(train, test, what)
    return train, test, normalizer_for(train, cfg)


def dataset_features(
    encoder: nn.Module | None,
    cfg: DataConfig,
    cache_dir: Path | None,
    tag: str,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 512,
    progress: bool = True,
    train_fraction: float = 1.0,
    blocks: int = 1,
) -> dict[str, torch.Tensor]:
    """Train and test features of the labelled dataset in ``cfg``, cached per encoder and data.

    The pre-training ``subset_fraction`` does not apply: the labelled train split is used whole, or
    the per-class ``train_fraction`` of it (low-shot evaluation, or a quicker look). Both splits are
    normalised alike (:func:`labelled_splits`).

    Args:
        encoder: The frozen encoder, or None for raw pixels.
        cfg: The data section (dataset, size, channels).
        cache_dir: Folder for ``features-<key>.pt``; None disables the cache.
        tag: Identifies the encoder in the cache key (e.g. the checkpoint path).
        device: Where to run the encoder.
        precision: ``bf16`` or ``fp32``.
        batch_size: Images per forward pass.
        progress: Show progress bars.
        train_fraction: Per-class fraction of the train split used as kNN bank / probe training set.
        blocks: Concatenate the pooled outputs of the last ``blocks`` blocks (see :func:`extract_features`).

    Returns:
        ``{"train_x", "train_y", "test_x", "test_y"}`` plus ``num_classes`` as a 0-d tensor.

    """
    cfg = dataclasses.replace(cfg, subset_fraction=1.0)
    path = None
    if cache_dir is not None:
        what = f"train{train_fraction}+test" + (f"+blocks{blocks}" if blocks > 1 else "")
        path = cache_dir / f"features-{_cache_key(tag, cfg, what, precision)}.pt"
        if path.is_file():
            cached = _read_cache(path)
            if cached is not None:
                log.info("using cached features %s", path)
                return cached
    train, test, norm = labelled_splits(cfg, "evaluation (kNN, linear probe)")
    train = train.per_class_fraction(train_fraction)
    if path is not None:
        # float32 features of both splits: refused now rather than after the extraction.
        dim = encoder.num_features * blocks if encoder is not None else cfg.channels * cfg.img_size ** 2
        check_room(path.parent, 4 * dim * (len(train) + len(test)) + (1 << 20), "the feature cache",
                   "free space there, or evaluate a copy of the run on another disk")
    out = {}
    for split, data in (("train", train), ("test", test)):
        loader = build_loader(data, cfg, batch_size, train=False, normalize=norm)
        out[f"{split}_x"], out[f"{split}_y"] = extract_features(
            encoder, loader, device, precision, progress, blocks if encoder is not None else 1)
    out["num_classes"] = torch.tensor(len(train.classes))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return out
