"""Resolve what to evaluate (a checkpoint or a baseline), run kNN / linear probe, write JSON."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.config import ConfigError, PretrainConfig, load_config
from mimkit.engine.checkpoint import load_weights, resolve_checkpoint
from mimkit.engine.distributed import resolve_device
from mimkit.engine.trainer import CONFIG_FILE, seed_everything
from mimkit.evaluation.features import dataset_features
from mimkit.evaluation.knn import knn_accuracy
from mimkit.evaluation.linear_probe import linear_probe
from mimkit.models import encoder_from_config

log = logging.getLogger(__name__)
BASELINES = ("pixels", "random")


@dataclass
class Subject:
    """The thing being evaluated and where its results go."""

    encoder: nn.Module | None
    cfg: PretrainConfig
    out_dir: Path
    tag: str
    label: str


def run_config_for(ckpt: Path) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to."""
    for folder in (ckpt, *ckpt.parents[:3]):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    raise ConfigError(f"no {CONFIG_FILE} found beside checkpoint {ckpt} or in its run folder")


def load_encoder(path: str | Path) -> tuple[nn.Module, PretrainConfig, Path]:
    """Rebuild a run's encoder and load its weights.

    Args:
        path: A run folder, its ``checkpoints`` folder, or one checkpoint.

    Returns:
        ``(encoder, the run's config, the checkpoint folder)``.

    """
    ckpt = resolve_checkpoint(path)
    cfg = load_config(run_config_for(ckpt))
    encoder = encoder_from_config(cfg)
    load_weights(encoder, ckpt, prefix="encoder.")
    return encoder, cfg, ckpt


def resolve_subject(
    run: str | None, baseline: str | None, config: str | None, overrides: list[str], seed: int = 0
) -> Subject:
    """Pick the encoder to evaluate: a trained checkpoint, raw pixels or a random-init encoder.

    Data overrides (``data.*``) apply on top of the run's (or ``config``'s) data section.
    """
    if baseline is not None and baseline not in BASELINES:
        raise ConfigError(f"--baseline {baseline!r} is unknown; valid: {', '.join(BASELINES)}")
    if run is None and baseline is None:
        raise ConfigError("give a run or checkpoint to evaluate, or --baseline pixels|random")
    if run is not None and baseline is None:
        ckpt = resolve_checkpoint(run)
        cfg = load_config(run_config_for(ckpt), overrides)
        encoder = encoder_from_config(cfg)
        load_weights(encoder, ckpt, prefix="encoder.")
        return Subject(encoder, cfg, ckpt, str(ckpt.resolve()), f"{cfg.method['name']} {ckpt.name}")
    if run is not None:
        cfg = load_config(run_config_for(resolve_checkpoint(run)), overrides)
    else:
        cfg = load_config(config, overrides)
    out = Path(cfg.run_dir) / f"baseline-{baseline}"
    if baseline == "pixels":
        return Subject(None, cfg, out, "pixels", "raw pixels")
    seed_everything(seed)
    enc = encoder_from_config(cfg)
    return Subject(enc, cfg, out, f"random-{cfg.backbone}-{seed}", f"random-init {cfg.backbone['name']}")


def features_for(subject: Subject, device: str, precision: str, batch_size: int, progress: bool,
                 train_fraction: float = 1.0, blocks: int = 1) -> dict[str, Any]:
    """Cached train/test features of ``subject`` on its labelled dataset (last ``blocks`` blocks pooled)."""
    return dataset_features(subject.encoder, subject.cfg.data, subject.out_dir, subject.tag,
                            resolve_device(device), precision, batch_size, progress, train_fraction, blocks)


def write_result(subject: Subject, kind: str, result: dict[str, Any]) -> Path:
    """Write ``<kind>.json`` beside the checkpoint (or in the baseline folder) and return its path."""
    subject.out_dir.mkdir(parents=True, exist_ok=True)
    row = {
        "evaluation": kind, "subject": subject.label, "dataset": subject.cfg.data.name,
        "img_size": subject.cfg.data.img_size, **result,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
        "torch": torch.__version__,
    }
    path = subject.out_dir / f"{kind}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    return path


def run_knn(subject: Subject, ks: tuple[int, ...], temperature: float, feats: dict[str, Any]) -> dict[str, Any]:
    """KNN accuracies for ``ks`` as a JSON-ready dict."""
    acc = knn_accuracy(feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"], ks,
                       temperature, int(feats["num_classes"]))
    return {f"top1_k{k}": v for k, v in acc.items()} | {"temperature": temperature,
                                                        "feature_dim": int(feats["train_x"].shape[1])}


def run_linprobe(feats: dict[str, Any], epochs: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    """Linear-probe accuracies as a JSON-ready dict."""
    res = linear_probe(feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"],
                       int(feats["num_classes"]), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return res | {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                  "feature_dim": int(feats["train_x"].shape[1])}
