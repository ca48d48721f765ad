"""Atomic checkpoints: weights as safetensors, the rest loadable with ``weights_only=True``.

A checkpoint is a folder ``step_XXXXXXXX`` holding ``model.safetensors`` and ``state.pt``. It is
written under a temporary name and renamed into place only when complete, so a process killed
mid-write (or a full disk) never leaves a folder that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: Path, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 2
) -> Path:
    """Write a complete checkpoint atomically and prune old ones.

    Args:
        ckpt_dir: The run's ``checkpoints`` folder.
        step: Optimizer steps taken so far (names the folder).
        model: The method; its ``state_dict`` is stored as safetensors.
        state: Everything else (optimizer, counters, RNG states); tensors and plain Python only.
        keep_last: How many complete checkpoints to keep (0 keeps all).

    Returns:
        The checkpoint folder.

    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        # The checkpoint just written always survives, even beside stale higher-numbered ones.
        others = [p for p in list_checkpoints(ckpt_dir) if p != final]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first; half-written temporaries are ignored."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p for p in ckpt_dir.iterdir()
        if _NAME.match(p.name) and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its ``model.safetensors``, a run folder or its ``checkpoints``.

    Raises:
        CheckpointError: When no complete checkpoint is there.

    """
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if (path / MODEL_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint at {path}")


def load_weights(model: nn.Module, ckpt: Path, prefix: str = "") -> None:
    """Load ``model.safetensors`` into ``model`` strictly, naming every mismatch.

    Args:
        model: Module to fill.
        ckpt: Checkpoint folder.
        prefix: Only keys starting with this (stripped), e.g. ``encoder.`` to load an encoder.

    Raises:
        CheckpointError: Missing or unexpected keys, or shape mismatches, listed by name.

    """
    file = ckpt / MODEL_FILE
    try:
        weights = load_file(str(file))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{file}: cannot read weights ({err})") from err
    if prefix:
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_short(shapes)}")
        raise CheckpointError(f"{file} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(weights)


def _short(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def load_state(ckpt: Path) -> dict[str, Any]:
    """Load ``state.pt`` with ``weights_only=True`` (no arbitrary code runs on load)."""
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot read training state ({err})") from err
