"""Frozen helpers: another run's model that a method uses and never trains.

BEiT's targets come from a visual tokenizer (Bao et al., "BEiT: BERT Pre-Training of Image
Transformers", ICLR 2022), which is a run of its own here; VQ-KD's tokenizer learns from the features
of a teacher run (Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual
Tokenizers", 2022). A helper is named by its run folder (``method.tokenizer``, ``method.teacher``).

- When the settings are composed, the helper run's settings are copied into the method's
  (``method.tokenizer_settings``), so the run that uses it records what it was built from, and builds
  it again from its own ``config.yaml`` without the helper's folder.
- Its weights are read from the helper run's newest checkpoint once, when a run starts fresh; after
  that they are part of the method's checkpoints, so resuming, evaluating and exporting need the
  run's own folder only.
- It takes no gradient, stays in evaluation mode whatever mode the method is put in, and is
  therefore outside the optimizer's groups and DDP's gradient buckets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from mimkit.errors import CheckpointError, ConfigError


def run_settings_of(run: str, key: str) -> dict[str, Any]:
    """The settings of the run in folder ``run`` (its ``config.yaml`` with its continuations), as a dict.

    Args:
        run: A run folder.
        key: The setting that named it, for the message.

    Raises:
        ConfigError: No run there, or its settings do not read.

    """
    from mimkit.engine.continuation import run_settings
    from mimkit.engine.run_folder import CONFIG_FILE

    if not run or not (Path(run) / CONFIG_FILE).is_file():
        raise ConfigError(f"{key}: no run at {run!r} (a run folder holding {CONFIG_FILE}); train the helper first "
                          f"(mimkit pretrain), or continue a run that used it from that run's own "
                          f"--config RUN/{CONFIG_FILE}, which records the helper's settings")
    return dataclasses.asdict(run_settings(Path(run)))


def fill_helper_settings(method_cfg: Any) -> Any:
    """``method_cfg`` with every helper's settings read from its run where they are not written yet.

    A method's ``Config`` declares its helpers in ``helpers``: ``{run setting: settings setting}``.
    Settings already written (a run's own ``config.yaml``) are kept, so a run that used a helper
    rebuilds it without the helper's folder.
    """
    filled = {}
    for run_key, settings_key in getattr(type(method_cfg), "helpers", {}).items():
        run = getattr(method_cfg, run_key)
        if run and not getattr(method_cfg, settings_key):
            filled[settings_key] = run_settings_of(run, f"method.{run_key}")
    return dataclasses.replace(method_cfg, **filled) if filled else method_cfg


def check_helper_data(method_cfg: Any, channels: int, mean: list[float], std: list[float]) -> list[str]:
    """Refuse a helper run trained on images of other channels; return a warning for each helper
    whose normalisation differs from this run's (it then sees its inputs shifted, not as it trained).

    Args:
        method_cfg: The method's typed ``Config``.
        channels: ``data.channels`` of this run.
        mean: ``data.mean`` of this run (resolved).
        std: ``data.std`` of this run (resolved).

    Raises:
        ConfigError: A helper trained on another number of channels.

    """
    warnings = []
    for run_key, settings_key in getattr(type(method_cfg), "helpers", {}).items():
        data = (getattr(method_cfg, settings_key) or {}).get("data", {})
        if not data:
            continue
        theirs = data.get("channels")
        if theirs != channels:
            raise ConfigError(f"method.{run_key}: the helper run trained on {theirs}-channel images, this run has "
                              f"data.channels={channels}; train the helper on images like these")
        if data.get("mean") and (list(data["mean"]) != list(mean) or list(data["std"]) != list(std)):
            warnings.append(f"method.{run_key}: the helper run normalised its images with mean {data['mean']} / std "
                            f"{data['std']}, this run with {mean} / {std}: it sees them otherwise than it trained")
    return warnings


def build_helper(settings: dict[str, Any], key: str) -> nn.Module:
    """The method a helper run trained, built from its recorded ``settings`` with fresh weights, frozen.

    Raises:
        ConfigError: The settings do not compose (named by ``key``).

    """
    from mimkit.models import compose_config, method_from_config

    try:
        cfg = compose_config([settings])
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    return freeze(method_from_config(cfg))


def freeze(module: nn.Module) -> nn.Module:
    """``module`` without gradients, in evaluation mode."""
    module.requires_grad_(False)
    return module.eval()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def load_helper_weights(module: nn.Module, run: str, recorded: dict[str, Any], key: str, prefix: str = "") -> Path:
    """A fresh run's start: load the newest checkpoint of helper run ``run`` into ``module`` (strictly).

    Args:
        module: The helper, built from ``recorded``.
        run: The helper run's folder.
        recorded: The helper's settings as this method recorded them.
        key: The setting naming the run, for the messages.
        prefix: Load only the checkpoint's keys under this (``encoder.``: a method's encoder).

    Returns:
        The checkpoint read.

    Raises:
        ConfigError: No run named (recorded settings alone would give an untrained helper), a run
            whose settings differ from the recorded ones, or no complete checkpoint in it.

    """
    from mimkit.engine.checkpoint import load_weights, resolve_checkpoint
    from mimkit.engine.run_folder import reading_run

    if not run:
        raise ConfigError(f"{key}: a fresh run reads the helper's weights from its run; name it (the recorded "
                          f"{key}_settings alone build an untrained helper)")
    # through JSON: tuples and lists, as a dataclass and a YAML file write them, compare equal
    now, then = (_flat(json.loads(json.dumps(t))) for t in (run_settings_of(run, key), recorded))
    differ = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if differ:
        raise ConfigError(f"{key}: the run at {run} has other settings than the recorded {key}_settings "
                          f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}); leave the recorded settings "
                          "out, so that they are read from the run")
    with reading_run(run):
        try:
            ckpt = resolve_checkpoint(run)
        except CheckpointError as err:
            raise ConfigError(f"{key}: {err}; the helper run must have saved a checkpoint") from None
        load_weights(module, ckpt, prefix)
    return ckpt


__all__ = ["build_helper", "check_helper_data", "fill_helper_settings", "freeze", "load_helper_weights",
           "run_settings_of"]
