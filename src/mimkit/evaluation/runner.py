"""Resolve what to evaluate (a checkpoint or a baseline), run kNN / linear probe, write JSON."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.config import ConfigError, PretrainConfig, on_other_data
from mimkit.engine.checkpoint import MODEL_FILE, build_for_weights, load_weights, resolve_checkpoint
from mimkit.engine.continuation import load_run_config
from mimkit.engine.distributed import resolve_device
from mimkit.engine.run_folder import run_config_for, write_json
from mimkit.engine.trainer import seed_everything
from mimkit.evaluation.features import dataset_features
from mimkit.evaluation.knn import knn_accuracy
from mimkit.evaluation.linear_probe import linear_probe
from mimkit.models import encoder_from_config, eval_prefix

log = logging.getLogger(__name__)
BASELINES = ("pixels", "random")


@dataclass
class Subject:
    """The thing being evaluated and where its results go.

    Attributes:
        data_changes: The ``data.*`` settings that differ from the run's (or config's) own data
            section, as ``{key: value}``; evaluations on other data are stored under other names.

    """

    encoder: nn.Module | None
    cfg: PretrainConfig
    out_dir: Path
    tag: str
    label: str
    data_changes: dict[str, Any] = field(default_factory=dict)


def load_run_encoder(path: str | Path) -> tuple[nn.Module, PretrainConfig, Path]:
    """Rebuild a run's encoder and load its weights.

    Args:
        path: A run folder, its ``checkpoints`` folder, or one checkpoint.

    Returns:
        ``(encoder, the run's config, the checkpoint folder)``.

    """
    ckpt = resolve_checkpoint(path)
    cfg = load_run_config(run_config_for(ckpt))
    encoder = build_for_weights(lambda: encoder_from_config(cfg), ckpt / MODEL_FILE, eval_prefix(cfg),
                                run_config_for(ckpt))
    load_weights(encoder, ckpt, prefix=eval_prefix(cfg))
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
    if run is not None and config is not None:
        raise ConfigError("--config applies to a baseline without a run; a run is evaluated with its own config")
    if run is not None:
        not_data = [o for o in overrides if not o.startswith("data.")]
        if not_data:
            raise ConfigError(f"a run is evaluated with its own model: only data.* settings apply, not "
                              f"{', '.join(not_data)}")
        ckpt = resolve_checkpoint(run)
        base_path, base_overrides = run_config_for(ckpt), []
    else:
        base_path = config
        base_overrides = [o for o in overrides if not o.startswith("data.")]
    complete = run is not None  # a run's config.yaml is written whole; a --config may be partial
    base = load_run_config(base_path, base_overrides, complete)
    cfg = load_run_config(base_path, overrides, complete)
    changes = {k: v for k, v in asdict(cfg.data).items() if asdict(base.data)[k] != v}
    cfg = replace(cfg, data=on_other_data(cfg.data, base.data.name, base.data.root, overrides))
    if run is not None and baseline is None:
        encoder = build_for_weights(lambda: encoder_from_config(cfg), ckpt / MODEL_FILE, eval_prefix(cfg), base_path)
        load_weights(encoder, ckpt, prefix=eval_prefix(cfg))
        return Subject(encoder, cfg, ckpt, str(ckpt.resolve()), f"{cfg.method.name} {ckpt.name}", changes)
    # Beside the run that was named (its config's run_dir may be relative to where it was trained).
    out = (base_path.parent if run is not None else Path(cfg.run_dir)) / f"baseline-{baseline}"
    if baseline == "pixels":
        return Subject(None, cfg, out, "pixels", "raw pixels", changes)
    seed_everything(seed)
    enc = encoder_from_config(cfg)
    return Subject(enc, cfg, out, f"random-{cfg.backbone}-{seed}", f"random-init {cfg.backbone['name']}", changes)


def features_for(subject: Subject, device: str, precision: str, batch_size: int, progress: bool,
                 train_fraction: float = 1.0, blocks: int = 1) -> dict[str, Any]:
    """Cached train/test features of ``subject`` on its labelled dataset (last ``blocks`` blocks pooled)."""
    return dataset_features(subject.encoder, subject.cfg.data, subject.out_dir, subject.tag,
                            resolve_device(device), precision, batch_size, progress, train_fraction, blocks)


#: Evaluation settings that change a result, their defaults, and how a non-default one is named.
PROTOCOL = {
    "train_fraction": (1.0, "frac{:g}"), "blocks": (1, "blocks{}"),
    "k": ((20, 200), "k{}"), "temperature": (0.07, "T{:g}"),
    "epochs": (100, "e{}"), "lr": (0.1, "lr{:g}"), "probe_batch_size": (1024, "pbs{}"), "seed": (0, "seed{}"),
    "precision": ("fp32", "{}"),
}
"""``precision`` is the resolved one: features extracted under bf16 autocast are named ``-bf16``."""


def result_name(subject: Subject, command: str, settings: dict[str, Any]) -> str:
    """The file stem of an evaluation: ``knn`` for the default protocol, else its non-default settings.

    Everything that changes a result is in the name, so no evaluation overwrites another's:
    e.g. ``knn-frac0.2``, ``linprobe-blocks3-e50``, ``knn-k10-T0.1-data3f9a1c`` (other data).

    Args:
        subject: What is evaluated (its ``data_changes`` name other data).
        command: ``knn`` or ``linprobe``.
        settings: Values for keys of :data:`PROTOCOL` (missing ones are taken as the defaults).

    """
    parts = [command]
    for key, (default, fmt) in PROTOCOL.items():
        value = settings.get(key, default)
        if isinstance(value, list | tuple):
            value, default = tuple(value), tuple(default)
            if value != default:
                parts.append(fmt.format("-".join(map(str, value))))
        elif value != default:
            parts.append(fmt.format(value))
    if subject.data_changes:
        blob = json.dumps(subject.data_changes, sort_keys=True, default=str)
        parts.append("data" + hashlib.sha1(blob.encode()).hexdigest()[:6])
    return "-".join(parts)


def write_result(subject: Subject, kind: str, result: dict[str, Any]) -> Path:
    """Write ``<kind>.json`` beside the checkpoint (or in the baseline folder) and return its path.

    The file is written whole under a temporary name and renamed, so a reader never sees half of it.
    """
    subject.out_dir.mkdir(parents=True, exist_ok=True)
    row = {
        "evaluation": kind, "subject": subject.label, "dataset": subject.cfg.data.name,
        "img_size": subject.cfg.data.img_size, "data_changes": subject.data_changes, **result,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
        "torch": torch.__version__,
    }
    return write_json(subject.out_dir / f"{kind}.json", row)


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
