"""Continuing a run: the same settings, or a recorded change to the few that may change.

A run's ``config.yaml`` is the record of the settings it trained with. A continuation
(``--resume``) must use them: any other value would train the rest of the run under settings the
record does not name (another method setting), or act on what the run already holds (a smaller
``train.keep_last`` deletes its checkpoints). So a resume compares its settings with the run's own
and refuses every difference, naming each key with both values.

A few settings may change on a continuation, because they lengthen or watch the run without
changing what a step computes (:data:`CONTINUABLE`). Such a change is written as one row of
``config-changes.jsonl`` (step, date, each key with its old and new value); ``config.yaml`` is never
rewritten, and :func:`run_settings` replays the rows over it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mimkit.backbones.from_timm import is_timm_source
from mimkit.config import PretrainConfig, load_yaml
from mimkit.engine.run_folder import CHANGES_FILE, CONFIG_FILE, write_text
from mimkit.errors import ConfigError
from mimkit.models import compose_config

#: The settings a continuation may change, and why that is safe. Everything else must match.
CONTINUABLE: dict[str, str] = {
    "train.epochs": "a longer (or shorter) schedule",
    "train.max_minutes": "a time limit",
    "train.budget_minutes": "a time budget the schedule is fitted to",
    "train.log_every": "how often the log is written",
    "train.ckpt_every_steps": "extra checkpoints (never fewer kept)",
    "train.progress": "the progress bar",
    "train.max_bad_steps": "how many non-finite steps in a row stop the run",
    "train.device": "where the run continues (cpu, cuda)",
    "train.wandb": "the Weights & Biases project the scalars are mirrored to",
    "data.num_workers": "loader processes (the images are the same)",
}
#: Never compared: the folder is where the run is, not a setting of it.
NOT_SETTINGS = ("run_dir",)
_UNSET = "(not set)"


def flat_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` as ``{"section.key": value}``, the method's with its defaults filled in."""
    from mimkit.backbones import backbone_defaults
    from mimkit.methods import check_method_cfg
    from mimkit.models import backbone_settings

    tree = asdict(cfg)
    try:  # the settings the modules are built with, defaults filled in, so writing a default out is no change
        tree["method"] = asdict(check_method_cfg(cfg.method))
        tree["backbone"] = {"name": cfg.backbone["name"], **backbone_defaults(cfg.backbone["name"]),
                            **backbone_settings(cfg)}
    except (ConfigError, KeyError, TypeError):  # an unparsable section compares as written
        pass
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = list(node) if isinstance(node, tuple) else node

    visit("", tree)
    for key in NOT_SETTINGS:
        out.pop(key, None)
    if out.get("init") and not is_timm_source(out["init"]):  # one checkpoint however its path was written
        out["init"] = str(Path(out["init"]).resolve())
    return out


def differences(old: PretrainConfig, new: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for every setting that differs (a missing key as ``(not set)``)."""
    a, b = flat_settings(old), flat_settings(new)
    return {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b)) if a.get(k, _UNSET) !=
            b.get(k, _UNSET)}


def read_changes(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``config-changes.jsonl``, oldest first, each checked.

    Raises:
        ConfigError: A row that is not a JSON object whose ``changes`` map continuable settings to
            ``{"from": ..., "to": ...}`` (the file, line and key named).

    """
    path = Path(run_dir) / CHANGES_FILE
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("changes"), dict):
            raise ConfigError(f"{where}: expected an object with a 'changes' mapping")
        for key, change in row["changes"].items():
            if key not in CONTINUABLE:
                raise ConfigError(f"{where}: {key} cannot change on a continuation; a run changes only "
                                  f"{', '.join(CONTINUABLE)}")
            if not isinstance(change, dict) or set(change) != {"from", "to"}:
                raise ConfigError(f"{where}: {key}: expected {{\"from\": ..., \"to\": ...}}, got {change!r}")
        rows.append(row)
    return rows


def run_settings(run_dir: Path) -> PretrainConfig:
    """The settings a run holds now: its ``config.yaml`` with every recorded continuation replayed over it.

    Raises:
        ConfigError: An invalid ``config.yaml`` or change row; the file at fault is named.

    """
    run_dir = Path(run_dir)
    own = load_run_config(run_dir / CONFIG_FILE)
    overrides = [f"{key}={json.dumps(change['to'])}" for row in read_changes(run_dir)
                 for key, change in row["changes"].items()]
    if not overrides:
        return own
    try:
        return compose_config([asdict(own)], overrides)
    except ConfigError as err:
        raise ConfigError(f"{run_dir / CHANGES_FILE}: {err}") from None


#: The sections ``config.yaml`` holds when a run writes it: a run's file that lacks one is cut short.
_RUN_SECTIONS = ("run_dir", "seed", "init", "data", "backbone", "method", "optim", "train")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None,
                    complete: bool = True) -> PretrainConfig:
    """A run's ``config.yaml`` read and checked like settings typed on the command line; errors name the file.

    Args:
        path: The file (None: the defaults).
        overrides: ``key=value`` settings over it.
        complete: Refuse a file without every section a run writes (a truncated or emptied
            ``config.yaml`` would otherwise read as defaults); False for a hand-written config.

    Raises:
        ConfigError: The file is missing, not valid YAML, cut short, or holds an unknown key or invalid value.

    """
    try:
        layers = [load_yaml(path)] if path is not None else []
        missing = [k for k in _RUN_SECTIONS if k not in layers[0]] if layers and complete else []
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}: a run writes its config.yaml whole, so this "
                              "one is cut short or not a run's")
        return compose_config(layers, overrides)
    except ConfigError as err:
        text = str(err)
        raise ConfigError(text if path is None or str(path) in text else f"{path}: {text}") from None


def check_continuation(run_dir: Path, new: PretrainConfig, named: str | None = None) -> dict[str, tuple[Any, Any]]:
    """Refuse to continue the run in ``run_dir`` under other settings; return the allowed changes.

    Args:
        run_dir: The run being continued (its ``config.yaml`` and ``config-changes.jsonl``).
        new: The settings given for the continuation.
        named: The checkpoint named by ``--resume`` (None for ``--resume auto``), for the message.

    Returns:
        ``{key: (run's value, new value)}`` for the :data:`CONTINUABLE` settings that change.

    Raises:
        ConfigError: Any other setting differs; each is named with both values, and the message
            gives the run's values to continue with.

    """
    own = run_settings(run_dir)
    diff = differences(own, new)
    refused = {k: v for k, v in diff.items() if k not in CONTINUABLE}
    if refused:
        listed = "; ".join(f"{k}: run {_show(a)}, now {_show(b)}" for k, (a, b) in refused.items())
        values = " ".join(f"{k}={json.dumps(a, default=str, separators=(',', ':'))}"
                          for k, (a, _) in refused.items() if a != _UNSET)
        other = (f"to train from its weights under new settings, start a new run_dir with init={named}"
                 if named else "for new settings start a new run_dir, or --overwrite this one")
        raise ConfigError(
            f"--resume would continue the run in {run_dir} under other settings ({listed}); to continue it, give "
            f"the run's own values ({values or 'leave the keys out'}); {other}. Only {', '.join(CONTINUABLE)} "
            "may change on a continuation")
    return {k: v for k, v in diff.items() if k in CONTINUABLE}


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]], source: Path | None = None) -> None:
    """Append one continuation's changed settings to ``config-changes.jsonl`` (nothing when there are none)."""
    if not changes and source is None:
        return
    row = {"step": step, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
    if source is not None:
        row["resumed_from"] = str(source)
    path = Path(run_dir) / CHANGES_FILE
    rows = path.read_text() if path.is_file() else ""
    write_text(path, rows + json.dumps(row, default=str) + "\n")  # rewritten whole: a crash never tears a row


def _show(value: Any) -> str:
    return value if value == _UNSET else json.dumps(value, default=str)


__all__ = ["CONTINUABLE", "check_continuation", "differences", "flat_settings", "load_run_config", "read_changes",
           "record_changes", "run_settings"]
