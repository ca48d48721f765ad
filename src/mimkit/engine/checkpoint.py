"""Atomic checkpoints: weights as safetensors, the rest loadable with ``weights_only=True``.

A checkpoint is a folder ``step_XXXXXXXX`` holding ``model.safetensors`` and ``state.pt``. It is
written under a temporary name and renamed into place only when complete, so a process killed
mid-write (or a full disk) never leaves a folder that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mimkit.engine.run_folder import describe_error
from mimkit.errors import CheckpointError, CheckpointMismatchError, ConfigError, NonFiniteError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


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


def nonfinite_tensors(tensors: dict[str, Any], limit: int = 3) -> list[str]:
    """Names of the floating-point tensors in a (nested) state that hold NaN or inf, at most ``limit``."""
    bad: list[str] = []

    def visit(name: str, value: Any) -> None:
        if len(bad) >= limit:
            return
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}.{k}" if name else str(k), v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v)

    visit("", tensors)
    return bad


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (``fsync``) before returning."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(
    ckpt_dir: Path, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 2
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; never write one that holds NaN.

    Args:
        ckpt_dir: The run's ``checkpoints`` folder.
        step: Optimizer steps taken so far (names the folder).
        model: The method; its ``state_dict`` is stored as safetensors.
        state: Everything else (optimizer, counters, RNG states); tensors and plain Python only.
        keep_last: How many complete checkpoints to keep (0 keeps all).

    Returns:
        The checkpoint folder.

    Raises:
        NonFiniteError: The weights or the optimizer state hold NaN or inf; nothing is written.
        CheckpointError: The write failed (a full disk, an unwritable folder); the previous
            checkpoints are left as they were.

    """
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(weights) or nonfinite_tensors(state.get("optimizer", {}))
    if bad:
        prev = latest_checkpoint(ckpt_dir)
        raise NonFiniteError(
            f"step {step}: {', '.join(bad)} hold NaN or inf, so no checkpoint was written; the last good "
            f"checkpoint is {prev or 'none (no checkpoint yet)'}. Lower optim.base_lr, set optim.clip_grad, "
            "or use train.precision=fp32, then resume with --resume auto")
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # Serialised in memory, written by Python: a full disk then raises OSError (ENOSPC), where
        # torch.save writing a file itself raised a RuntimeError with no cause in it.
        write_file(tmp / MODEL_FILE, safetensors_bytes(weights))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_file(tmp / STATE_FILE, buffer.getvalue())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(ckpt_dir)
        raise CheckpointError(
            f"cannot write checkpoint {final}: {describe_error(err)}; the previous checkpoint "
            f"{prev or '(none yet)'} is intact; make room and resume with --resume auto") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        # The checkpoint just written always survives, even beside stale higher-numbered ones; one
        # that holds evaluation results is kept too: rotation never deletes a result.
        others = [p for p in list_checkpoints(ckpt_dir) if p != final and not holds_results(p)]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


#: Files that evaluation writes beside a checkpoint (kNN, linear probe, fine-tuning, transfer).
RESULT_PATTERNS = ("knn*.json", "linprobe*.json", "finetune.json", "transfer-*.json")


def holds_results(ckpt: Path) -> bool:
    """Whether an evaluation wrote its result beside this checkpoint (rotation then keeps it)."""
    return any(next(ckpt.glob(pattern), None) is not None for pattern in RESULT_PATTERNS)


def checkpoint_bytes(model: nn.Module) -> int:
    """About what one checkpoint of ``model`` takes on disk: weights plus AdamW's two moments."""
    return 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (64 << 10)


def remove_temporaries(ckpt_dir: Path) -> list[Path]:
    """Delete half-written ``.tmp-step_*`` folders left by a killed process (call under the run lock)."""
    stale = sorted(ckpt_dir.glob(".tmp-step_*")) if ckpt_dir.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    return stale


def set_aside(ckpt: Path, why: str = "corrupt") -> Path:
    """Rename a checkpoint to ``<why>-<name>`` (``corrupt``, ``superseded``) so it is kept but never picked again."""
    target = ckpt.with_name(f"{why}-{ckpt.name}")
    n = 1
    while target.exists():
        target, n = ckpt.with_name(f"{why}{n}-{ckpt.name}"), n + 1
    os.replace(ckpt, target)
    return target


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint folder ``step_XXXXXXXX`` was written at."""
    return int(_NAME.match(ckpt.name).group(1))


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


def read_weights(model: nn.Module, ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` and check that it fits ``model`` and is finite, without loading it.

    Args:
        model: The module the weights are for.
        ckpt: Checkpoint folder.
        prefix: Only keys starting with this (stripped), e.g. ``encoder.`` to load an encoder.

    Returns:
        The weights, keyed as in ``model.state_dict()``.

    Raises:
        CheckpointError: An unreadable file, missing or unexpected keys, shape mismatches (listed
            by name), or NaN/inf values.

    """
    file = ckpt / MODEL_FILE
    weights = read_safetensors(file)
    if prefix:
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if hasattr(model, "upgrade_state_dict"):  # a method's checkpoint from before one of its parts moved
        weights = model.upgrade_state_dict(weights)
    return check_weights(model, weights, file)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, any failure a :class:`CheckpointError` naming it."""
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{file}: cannot read weights ({err})") from None


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """``weights`` if they fit ``model`` exactly (keys, shapes) and are finite; else an error naming ``file``.

    Raises:
        CheckpointMismatchError: Missing or unexpected keys, or shape mismatches, listed by name.
        CheckpointError: NaN/inf values.

    """
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in weights.items()}, file)
    bad = nonfinite_tensors(weights)
    if bad:
        raise CheckpointError(f"{file}: {', '.join(bad)} hold NaN or inf")
    return weights


def weight_shapes(file: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The tensor shapes in a safetensors file, read from its header alone (no weights are loaded).

    Raises:
        CheckpointError: The file cannot be read.

    """
    try:
        with safe_open(str(file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{file}: cannot read weights ({err})") from None
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def build_for_weights(build: Callable[[], nn.Module], file: Path, prefix: str = "",
                      settings: Path | None = None) -> nn.Module:
    """``build()``, once the weights in ``file`` are known to fit what it will build (see :func:`check_fits`)."""
    check_fits(build, file, prefix, settings)
    return build()


def check_fits(build: Callable[[], nn.Module], file: Path, prefix: str = "", settings: Path | None = None) -> None:
    """Refuse weights that do not fit what ``build`` would build, without building it for real.

    The module is built on the meta device, which allocates nothing, and its state dict compared
    with the file's header. So settings read from a file (a run's ``config.yaml``, an export's
    ``encoder.json``) that describe a much larger model than the weights are refused before any
    memory is taken for them.

    Args:
        build: Builds the module from the settings.
        file: The safetensors file the module will be loaded from.
        prefix: Only keys starting with this (stripped), e.g. ``encoder.``.
        settings: The file the settings were read from, named in a builder's refusal.

    Raises:
        CheckpointMismatchError: Missing, unexpected or differently shaped tensors, listed by name.
        CheckpointError: The file cannot be read.
        ConfigError: The builder refuses a setting (heads that do not divide the width, ...).

    """
    shapes = weight_shapes(file, prefix)
    try:
        with torch.device("meta"):
            skeleton = build()
    except ConfigError as err:
        text = str(err)
        raise ConfigError(text if settings is None or str(settings) in text else f"{settings}: {text}") from None
    except (RuntimeError, NotImplementedError, ValueError) as err:  # a builder that computes on real tensors
        log.warning("cannot build the model on the meta device (%s); its size is checked after it is built", err)
        return
    if hasattr(skeleton, "upgrade_state_dict"):  # a method's checkpoint from before one of its parts moved
        shapes = skeleton.upgrade_state_dict(shapes)
    check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes, file)


#: Tensors a module resamples to its own shape when it loads them: a learned position embedding
#: ``[1, L, D]`` of another grid (a ViT pre-trained at 64 px, evaluated or fine-tuned at 224).
RESAMPLED = ("pos_embed",)


def _resampled(key: str, own: tuple[int, ...], found: tuple[int, ...]) -> bool:
    return (key.rsplit(".", 1)[-1] in RESAMPLED and len(own) == len(found) == 3 and own[0] == found[0]
            and own[2] == found[2])


def check_shapes(own: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], file: Path) -> None:
    """Refuse ``found`` (a file's tensor shapes) unless its keys and shapes are exactly ``own``'s
    (but for the :data:`RESAMPLED` ones, which the module resamples from any grid of the same width).

    Raises:
        CheckpointMismatchError: Missing or unexpected keys, or shape mismatches, listed by name.

    """
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    shapes = [f"{k}: checkpoint {found[k]} vs model {own[k]}" for k in sorted(set(own) & set(found))
              if tuple(own[k]) != tuple(found[k]) and not _resampled(k, tuple(own[k]), tuple(found[k]))]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_short(shapes)}")
        raise CheckpointMismatchError(f"{file} does not fit this architecture: " + "; ".join(parts))


def load_weights(model: nn.Module, ckpt: Path, prefix: str = "") -> None:
    """Load ``model.safetensors`` into ``model`` strictly (see :func:`read_weights` for the checks)."""
    model.load_state_dict(read_weights(model, ckpt, prefix))


def _short(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def load_state(ckpt: Path) -> dict[str, Any]:
    """Load ``state.pt`` with ``weights_only=True`` (no arbitrary code runs on load)."""
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot read training state ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / STATE_FILE}: expected a mapping, got {type(state).__name__}")
    bad = nonfinite_tensors(state.get("optimizer", {}))
    if bad:
        raise CheckpointError(f"{ckpt / STATE_FILE}: optimizer state {', '.join(bad)} holds NaN or inf")
    return state
