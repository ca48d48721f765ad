"""Transfer: one checkpoint judged on several labelled datasets (``mimkit transfer``).

For each dataset, the frozen encoder's kNN and linear probe (the protocol of ``mimkit knn`` and
``mimkit linprobe``) and, when asked, a fine-tuning run (``mimkit finetune``): an encoder is judged
by transfer to other data, as Chen et al. judge MixedAE on eleven classification datasets ("Mixed
Autoencoder for Self-supervised Visual Representation Learning", CVPR 2023, the transferability
table). A dataset is given as ``NAME[:key=value,...]`` with any ``data.*`` setting: a packaged
dataset (``cifar10``), an image folder (``imagefolder:root=/data/pets,img_size=64``), other sizes.
Images are converted to the channels the encoder was trained on. Every per-dataset result is also
written where ``mimkit knn`` / ``linprobe`` / ``finetune`` would write it, under a name that says
which data it was on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mimkit.config import DataConfig, EvalConfig
from mimkit.data import build_dataset, check_labelled
from mimkit.engine.checkpoint import resolve_checkpoint
from mimkit.engine.continuation import load_run_config
from mimkit.engine.distributed import resolve_device
from mimkit.engine.precision import resolve_precision
from mimkit.engine.run_folder import CONFIG_FILE, RunFolder, check_writable, run_config_for, write_json
from mimkit.errors import ConfigError
from mimkit.evaluation.runner import (
    features_for,
    resolve_subject,
    result_name,
    run_knn,
    run_linprobe,
    write_result,
)

DATA_KEYS = tuple(DataConfig.__dataclass_fields__)


def parse_dataset(spec: str) -> dict[str, str]:
    """``NAME[:key=value,...]`` as ``{"name": NAME, key: value, ...}`` (``data.*`` keys, values as text).

    Raises:
        ConfigError: No name, a part that is not ``key=value``, or a key that is not a data setting.

    """
    name, _, rest = spec.partition(":")
    if not name or "=" in name:
        raise ConfigError(f"dataset {spec!r}: expected NAME[:key=value,...], e.g. cifar10 or "
                          "imagefolder:root=/data/pets,img_size=64")
    settings = {"name": name}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        key = key.removeprefix("data.")
        if not eq:
            raise ConfigError(f"dataset {spec!r}: {part!r} is not key=value")
        if key not in DATA_KEYS or key == "name":
            raise ConfigError(f"dataset {spec!r}: {key!r} is not a data setting; valid: "
                              f"{', '.join(k for k in DATA_KEYS if k != 'name')}")
        settings[key] = value
    return settings


def dataset_overrides(spec: str, run_channels: int, extra: list[str]) -> list[str]:
    """The ``data.*`` overrides that evaluate a run on ``spec``: its own root and whole split by default.

    Args:
        spec: ``NAME[:key=value,...]``.
        run_channels: The channels the encoder takes; the images are converted to them.
        extra: ``data.*`` settings for every dataset (applied before the spec's own).

    Raises:
        ConfigError: A spec (or ``extra``) asking for other channels than the encoder takes.

    """
    settings = parse_dataset(spec)
    base = {"root": "", "subset_fraction": "1.0", "channels": str(run_channels)}
    for item in extra:
        key, _, value = item.partition("=")
        base[key.removeprefix("data.")] = value
    merged = {**base, **settings}
    if merged["channels"].strip() != str(run_channels):
        raise ConfigError(f"dataset {spec!r}: data.channels={merged['channels']} but the encoder takes "
                          f"{run_channels} channel(s); images are converted to the encoder's channels, so leave "
                          "data.channels out")
    return [f"data.{k}={v}" for k, v in merged.items()]


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def transfer(run: str, specs: list[str], extra: list[str] | None = None, finetune: bool = False,
             finetune_config_name: str = "fmnist", finetune_overrides: list[str] | None = None,
             device: str = "auto", precision: str = "auto", progress: bool = True,
             protocol: EvalConfig | None = None) -> tuple[list[dict], Path]:
    """Evaluate a run's encoder on each dataset; the rows and the summary JSON's path.

    Args:
        run: A pre-training run folder or checkpoint.
        specs: Datasets, ``NAME[:key=value,...]`` (see :func:`parse_dataset`).
        extra: ``data.*`` settings for every dataset.
        finetune: Also fine-tune the encoder on each dataset (``<run>/finetune-transfer-<dataset>``).
        finetune_config_name: The fine-tuning config (``configs/finetune/<name>.yaml`` or a path).
        finetune_overrides: Non-data settings of the fine-tuning runs (``train.epochs=5``, ...).
        device: ``auto``, ``cpu``, ``cuda``.
        precision: ``auto``, ``bf16``, ``fp32`` for feature extraction.
        progress: Progress bars.
        protocol: The kNN, linear-probe and extraction settings (``configs/eval/default.yaml`` if None).

    Returns:
        ``(rows, path of transfer-<hash>.json beside the checkpoint)``: one row per dataset with its
        sizes, kNN, linear-probe and fine-tune top-1.

    Raises:
        ConfigError: A bad spec, or a dataset that cannot be scored, before anything is extracted.

    """
    from mimkit.config import load_eval_config

    protocol = protocol or load_eval_config()
    not_data = [e for e in (extra or []) if not e.startswith("data.")]
    if not_data:
        raise ConfigError(f"the datasets take data.* settings only, not {', '.join(not_data)}")
    if finetune_overrides and not finetune:
        raise ConfigError(f"{', '.join(finetune_overrides)}: settings other than data.* are fine-tuning settings and "
                          "apply with --finetune only")
    ks, fraction, blocks = tuple(protocol.knn.k), protocol.features.train_fraction, protocol.features.blocks
    ckpt = resolve_checkpoint(run)
    check_writable(ckpt, "transfer results", "results are written beside the checkpoint: transfer a writable copy "
                   "of the run")
    if finetune:
        check_writable(run_config_for(ckpt).parent, "fine-tuning runs", "they are written in the run's folder: "
                       "transfer a writable copy of the run")
    channels = load_run_config(run_config_for(ckpt)).data.channels
    plans = [(spec, dataset_overrides(spec, channels, extra or [])) for spec in specs]
    subjects = [(spec, resolve_subject(str(ckpt), None, None, overrides)) for spec, overrides in plans]
    for spec, subject in subjects:  # every dataset found and labelled before the first is extracted
        # Listed, not decoded (cache=no): the extraction below decodes each dataset once.
        listed = dataclasses.replace(subject.cfg.data, subset_fraction=1.0, cache="no")
        check_labelled(build_dataset(listed, "train"), build_dataset(listed, "test"), f"transfer to {spec}")
    if finetune:  # a fine-tuning folder another process holds is refused now, not after the extractions
        for spec, overrides in plans:
            target = _finetune_target(ckpt, spec, overrides, finetune_config_name, finetune_overrides or [])
            RunFolder(target).check_not_in_use()
    prec = resolve_precision(precision, resolve_device(device))
    rows = []
    for (spec, subject), (_, overrides) in zip(subjects, plans, strict=True):
        feats = features_for(subject, device, precision, protocol.features.batch_size, progress, fraction, blocks)
        settings = {"train_fraction": fraction, "blocks": blocks, "precision": prec, "k": ks}
        # The protocol `mimkit knn` and `mimkit linprobe` run, so the results are named as theirs would be.
        knn_settings = settings | {"temperature": protocol.knn.temperature}
        knn = run_knn(subject, tuple(ks), protocol.knn.temperature, feats) | knn_settings
        write_result(subject, result_name(subject, "knn", knn_settings), knn)
        lin_settings = {k: v for k, v in settings.items() if k != "k"} | {
            "epochs": protocol.linprobe.epochs, "lr": protocol.linprobe.lr,
            "probe_batch_size": protocol.linprobe.batch_size, "seed": 0}
        lin = run_linprobe(feats, protocol.linprobe.epochs, protocol.linprobe.lr, protocol.linprobe.batch_size, 0)
        lin |= lin_settings
        write_result(subject, result_name(subject, "linprobe", lin_settings), lin)
        d = subject.cfg.data
        row = {"dataset": spec, "name": d.name, "img_size": d.img_size, "channels": d.channels,
               "train_images": int(feats["train_x"].shape[0]), "test_images": int(feats["test_x"].shape[0]),
               "classes": int(feats["num_classes"]), **{f"knn_k{k}": knn[f"top1_k{k}"] for k in ks},
               "linprobe": lin["top1"]}
        if finetune:
            row |= _finetune(ckpt, spec, overrides, finetune_config_name, finetune_overrides or [])
        rows.append(row)
    summary = {"checkpoint": str(ckpt.resolve()), "datasets": specs, "extra": extra or [], "finetune": finetune,
               "protocol": dataclasses.asdict(protocol), "precision": prec, "rows": rows,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    key = _digest(specs, extra or [], finetune, finetune_config_name, finetune_overrides or [], prec,
                  dataclasses.asdict(protocol))
    return rows, write_json(ckpt / f"transfer-{key[:8]}.json", summary)


def _finetune_target(ckpt: Path, spec: str, data_overrides: list[str], config: str, overrides: list[str]) -> Path:
    """The folder of one dataset's fine-tuning run, named by the checkpoint and every setting that shapes it."""
    digest = _digest(str(ckpt.resolve()), data_overrides, config, overrides)[:8]
    return run_config_for(ckpt).parent / f"finetune-transfer-{parse_dataset(spec)['name']}-{digest}"


def _finetune(ckpt: Path, spec: str, data_overrides: list[str], config: str, overrides: list[str]) -> dict:
    """Fine-tune on one dataset and score it; a run with the very same settings is resumed, not repeated.

    The folder is named by everything that shapes the run (the dataset, the shared data settings,
    the fine-tuning config and its overrides), so other settings never continue this one's run.
    """
    from mimkit.evaluation.finetune import finetune_config, run_finetune

    target = _finetune_target(ckpt, spec, data_overrides, config, overrides)
    cfg = finetune_config(str(ckpt), config, [*data_overrides, *overrides, f"run_dir={target}"])
    result, _, _ = run_finetune(cfg, resume="auto" if (target / CONFIG_FILE).is_file() else None)
    return {"finetune": result["top1"], **({"finetune_ema": result["top1_ema"]} if "top1_ema" in result else {})}


def transfer_table(rows: list[dict[str, Any]], ks: tuple[int, ...] = (20, 200)) -> str:
    """The rows as one Markdown table."""
    tuned = any("finetune" in r for r in rows)
    head = ["dataset", "size", "channels", "train / test", "classes", *[f"kNN k={k}" for k in ks], "linear probe"]
    head += ["fine-tune"] if tuned else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["img_size"], r["channels"], f"{r['train_images']} / {r['test_images']}", r["classes"],
                 *[f"{r[f'knn_k{k}']:.2f}" for k in ks], f"{r['linprobe']:.2f}"]
        cells += [f"{r['finetune']:.2f}" if "finetune" in r else "-"] if tuned else []
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


__all__ = ["dataset_overrides", "parse_dataset", "transfer", "transfer_table"]
