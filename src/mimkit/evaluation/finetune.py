"""Fine-tune a pre-trained encoder (or the same backbone from scratch) and score it on the test split.

The fine-tuning run is an ordinary engine run (resume, DDP, bf16, time budget, NaN guard and
checkpoints all come with it) of the ``finetune`` method, configured by layering a fine-tuning
config (``configs/finetune/*.yaml``) over the pre-training run's own: the backbone and data stay,
the method, optimizer and schedule are replaced. It lives in ``<run>/finetune-<config>[-scratch]``.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mimkit.config import CONFIG_ROOT, PretrainConfig, load_yaml, on_other_data, resolve_config_path
from mimkit.data import build_dataset, build_loader, check_labelled, normalizer_for
from mimkit.engine.checkpoint import MODEL_FILE, latest_checkpoint, load_weights, resolve_checkpoint
from mimkit.engine.continuation import load_run_config
from mimkit.engine.distributed import resolve_device
from mimkit.engine.precision import autocast, resolve_precision
from mimkit.engine.run_folder import RunFolder, run_config_for, write_json
from mimkit.errors import ConfigError
from mimkit.models import compose_config, method_from_config

RESULT_FILE = "finetune.json"


def finetune_config_path(name: str) -> Path:
    """A fine-tuning config: a YAML path, or a name under ``configs/finetune/``."""
    packaged = CONFIG_ROOT / "finetune" / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    try:
        return resolve_config_path(name)
    except ConfigError:
        known = sorted(p.stem for p in (CONFIG_ROOT / "finetune").glob("*.yaml"))
        raise ConfigError(f"fine-tuning config {name!r} not found: not a file, and not a packaged one "
                          f"({', '.join(known)})") from None


def finetune_config(run: str | None, config: str = "fmnist", overrides: list[str] | None = None,
                    scratch: bool = False, arch: str | None = None, resume: bool = False) -> PretrainConfig:
    """The config of fine-tuning ``run``'s encoder (or, ``scratch``, its backbone from random weights).

    Args:
        run: A pre-training run folder or checkpoint; None with ``scratch`` and ``arch``.
        config: The fine-tuning config (``configs/finetune/<name>.yaml`` or a path).
        overrides: ``key=value`` settings applied last.
        scratch: Random initialisation: the supervised baseline of the same backbone, with no
            layer-wise lr decay (``method.layer_decay=1``; an override still wins).
        arch: A pre-training config naming the backbone and data, for ``scratch`` without a run.
        resume: The fine-tuning is to be continued: given a run folder (not one checkpoint), it
            starts from the checkpoint its record names, not from the run's newest, which may have
            come (and rotated the recorded one away) since.

    Raises:
        ConfigError: Neither a run nor ``--scratch --config``, or a setting that is refused.

    """
    if run is None and not (scratch and arch):
        raise ConfigError("give a pre-training run to fine-tune, or --scratch with --config CONFIG for a "
                          "backbone trained from random weights")
    if run is not None and arch is not None:
        raise ConfigError(f"--config {arch} names the pre-training config of a run-less --scratch baseline, and a "
                          "run brings its own; the fine-tuning config is --finetune-config")
    ckpt = resolve_checkpoint(run) if run is not None else None
    base_path = run_config_for(ckpt) if ckpt is not None else resolve_config_path(arch)
    load_run_config(base_path)  # the run's own settings checked on their own, so an error names its file
    base = load_yaml(base_path)
    ft_path = finetune_config_path(config)
    root = base_path.parent if ckpt is not None else Path(base.get("run_dir", "runs/default"))
    run_dir = root / f"finetune-{ft_path.stem}{'-scratch' if scratch else ''}"
    init = "" if scratch else str(ckpt.resolve())  # absolute: a resume may start elsewhere
    if resume and not scratch and not (Path(run) / MODEL_FILE).is_file():
        recorded = _recorded_init(overrides or [], run_dir)
        init = recorded or init
    layers = [base, load_yaml(ft_path), {"init": init, "run_dir": str(run_dir)}]
    if scratch:
        # Layer-wise decay protects pre-trained lower layers; random ones have nothing to protect and
        # would learn at a fraction of the lr. The baseline trains every layer at the full lr.
        layers.append({"method": {"name": "finetune", "layer_decay": 1.0}})
    cfg = compose_config(layers, overrides)
    own = base.get("data") or {}
    cfg = dataclasses.replace(cfg, data=on_other_data(cfg.data, own.get("name", cfg.data.name),
                                                      own.get("root", cfg.data.root), overrides))
    if cfg.method.name != "finetune":
        raise ConfigError(f"{ft_path}: method.name must be finetune, got {cfg.method.name!r}")
    return _with_classes(cfg)


def _recorded_init(overrides: list[str], default_dir: Path) -> str:
    """The ``init`` that the fine-tuning run to be continued recorded ("" when there is none yet)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    record = Path(given[-1] if given else default_dir) / "config.yaml"
    return load_run_config(record).init if record.is_file() else ""


def _with_classes(cfg: PretrainConfig) -> PretrainConfig:
    """Check the dataset can be scored and size the head by its classes (or check the given size)."""
    # Listed, not decoded (cache=no): the run decodes its data itself.
    listed = dataclasses.replace(cfg.data, cache="no")
    train = build_dataset(listed, "train")
    test = build_dataset(dataclasses.replace(listed, subset_fraction=1.0), "test")
    check_labelled(train, test, "fine-tuning")
    given = cfg.method.num_classes
    if given and given != len(train.classes):
        raise ConfigError(f"method.num_classes {given} does not match the {len(train.classes)} classes of "
                          f"dataset {cfg.data.name}; leave it at 0 to take them from the dataset")
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, num_classes=len(train.classes)))


@torch.no_grad()
def test_accuracy(cfg: PretrainConfig, ckpt: Path, device: str = "auto", precision: str = "auto",
                  batch_size: int = 512) -> dict[str, Any]:
    """Top-1 of a fine-tuned checkpoint on the whole test split (no test-time augmentation).

    Returns:
        ``{"top1": %, "test_images": N, "precision": resolved}``, and ``"top1_ema"`` for the
        weight average when the run kept one.

    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    method = method_from_config(dataclasses.replace(cfg, init=""))
    load_weights(method, ckpt)
    method.to(dev).eval()
    test = build_dataset(dataclasses.replace(cfg.data, subset_fraction=1.0), "test")
    # The statistics the fine-tuning run normalised with: stored in its config, or its training set's.
    train = None if cfg.data.mean else build_dataset(cfg.data, "train")
    loader = build_loader(test, cfg.data, batch_size, train=False, normalize=normalizer_for(train, cfg.data))
    scored = [False, True] if method.ema is not None else [False]
    correct, total = dict.fromkeys(scored, 0), 0
    for batch in loader:
        batch = batch.to(dev)
        for ema in scored:
            with autocast(dev, prec):
                logits = method.logits(batch.images, ema=ema)
            correct[ema] += int((logits.argmax(-1) == batch.labels).sum())
        total += batch.size
    result = {"top1": 100.0 * correct[False] / total, "test_images": total, "precision": prec}
    if True in correct:
        result["top1_ema"] = 100.0 * correct[True] / total
    return result


def write_finetune_result(cfg: PretrainConfig, ckpt: Path, result: dict[str, Any]) -> Path:
    """``finetune.json`` beside the fine-tuned checkpoint, with what was fine-tuned and how."""
    # As the run recorded it: the checkpoint may be gone by now (rotated out of its run), the score is not.
    source = cfg.init or "scratch"
    row = {"evaluation": "finetune", "subject": _label(cfg), "init": source, "dataset": cfg.data.name,
           "img_size": cfg.data.img_size, "checkpoint": str(ckpt), **result,
           "method": asdict(cfg.method), "optim": asdict(cfg.optim), "epochs": cfg.train.epochs,
           "budget_minutes": cfg.train.budget_minutes,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "torch": torch.__version__}
    return write_json(ckpt / RESULT_FILE, row)


def _label(cfg: PretrainConfig) -> str:
    part = cfg.method.trainable_blocks
    what = "fine-tune" if part == -1 else f"partial fine-tune (last {part})"
    origin = "scratch" if not cfg.init else Path(cfg.init).name
    return f"{what} {cfg.backbone['name']} from {origin}"


def run_finetune(cfg: PretrainConfig, resume: str | None = None,
                 overwrite: bool = False) -> tuple[dict[str, Any], Path, Path]:
    """Train a fine-tuning run, score its last checkpoint on the test split and write ``finetune.json``.

    Args:
        cfg: From :func:`finetune_config`.
        resume: ``auto`` or a checkpoint, as for ``mimkit pretrain``.
        overwrite: Replace a fine-tuning run already in ``cfg.run_dir``.

    Returns:
        ``(result, path of finetune.json, run folder)``.

    """
    from mimkit.engine import pretrain

    run_dir = pretrain(cfg, resume=resume, overwrite=overwrite)
    # Held while it is scored: no other command replaces the run between its last step and its score.
    with RunFolder(run_dir).reading():
        ckpt = finished_checkpoint(cfg)
        result = test_accuracy(cfg, ckpt, cfg.train.device, cfg.train.precision)
        return result, write_finetune_result(cfg, ckpt, result), run_dir


def finished_checkpoint(cfg: PretrainConfig) -> Path:
    """The newest checkpoint of a fine-tuning run (raises if it has none)."""
    ckpt = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"fine-tuning run {cfg.run_dir} has no checkpoint to score")
    return ckpt


__all__ = ["RESULT_FILE", "finetune_config", "finetune_config_path", "finished_checkpoint", "run_finetune",
           "test_accuracy", "write_finetune_result"]
