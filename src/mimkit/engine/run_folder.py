"""A run folder that is never mixed, never written by two processes, and checked before it is touched.

A run folder holds one run: ``config.yaml``, ``metrics.jsonl``, ``train.log``, ``tb/`` and
``checkpoints/``. A new run refuses a folder that already holds one unless it is told to continue it
(``--resume``) or to replace it (``--overwrite``); an exclusive ``flock`` on ``.lock`` refuses a
second writer while the first is alive (the kernel drops the lock when a process dies, even by
``kill -9``). Evaluation results of baselines (``baseline-*``) are not part of the run and survive a
replacement.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mimkit.engine.logging import METRICS_FILE
from mimkit.errors import ConfigError, RunFolderError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
#: What a run writes into its folder; ``--overwrite`` removes exactly these, and the fine-tunings
#: of its checkpoints (``finetune-*``), which belong to the run they started from.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "train.log", "tb", "checkpoints", "reconstructions.png", "loss_curve.png")
DERIVED = "finetune-*"


def run_config_for(ckpt: Path) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to (beside it, or up to three folders up).

    Raises:
        ConfigError: No run config is found.

    """
    for folder in (ckpt, *ckpt.parents[:3]):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    raise ConfigError(f"no {CONFIG_FILE} found beside checkpoint {ckpt} or in its run folder")


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def describe_error(err: OSError) -> str:
    """``err``'s cause in words, with the two a user must act on spelled out."""
    if err.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write there ({err.strerror})"
    return err.strerror or str(err)


class RunFolder:
    """The folder of one run, and the lock that makes this process its only writer.

    Args:
        path: The run folder (``run_dir``); it need not exist yet.

    """

    def __init__(self, path: str | Path) -> None:
        """Remember the folder; nothing is read or written until :meth:`lock`."""
        self.path = Path(path)
        self._fd: int | None = None

    def contents(self) -> list[str]:
        """The run files present, e.g. ``["config.yaml", "checkpoints (3)"]``; empty for a new folder."""
        found = []
        for name in RUN_FILES:
            item = self.path / name
            if name == "checkpoints" and item.is_dir():
                count = sum(1 for p in item.iterdir() if p.name.startswith("step_"))
                if count:
                    found.append(f"checkpoints ({count})")
            elif item.exists():
                found.append(name)
        return found

    def check_not_in_use(self) -> None:
        """Refuse the folder when a live process holds its lock (reads only: nothing is created).

        Raises:
            RunFolderError: Another process is writing this run.

        """
        lock = self.path / LOCK_FILE
        if not lock.is_file() or self._fd is not None:
            return
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise RunFolderError(self._in_use_message()) from None
        finally:
            os.close(fd)

    def _in_use_message(self) -> str:
        try:
            pid = (self.path / LOCK_FILE).read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        return (f"run folder {self.path} is in use by another mimkit process (pid {pid}); wait for it to "
                "finish or choose another run_dir")

    def lock(self) -> None:
        """Create the folder if needed, take its lock and prove it writable.

        Raises:
            RunFolderError: The folder cannot be created or written, or another process holds it.

        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot write run folder {self.path}: {describe_error(err)}; "
                                 "choose a writable run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(self._in_use_message()) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            self.release()
            raise RunFolderError(f"cannot write run folder {self.path}: {describe_error(err)}; "
                                 "choose a writable run_dir") from None

    def check_space(self, needed_bytes: int) -> None:
        """Refuse a disk without room for one checkpoint (``needed_bytes``), before training starts."""
        free = shutil.disk_usage(self.path).free
        if free < needed_bytes:
            raise RunFolderError(
                f"run folder {self.path}: {free / 2**20:.1f} MiB free, but one checkpoint needs about "
                f"{needed_bytes / 2**20:.1f} MiB; free space or choose another run_dir")

    def clear(self) -> list[str]:
        """Remove the previous run's files (``--overwrite``); returns what was removed."""
        removed = self.contents()
        derived = sorted(self.path.glob(DERIVED))
        for item in [*(self.path / name for name in RUN_FILES), *derived]:
            if item.is_dir():
                shutil.rmtree(item)
            elif item.exists():
                item.unlink()
        return removed + [d.name for d in derived]

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would race with a process opening it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


__all__ = ["CONFIG_FILE", "LOCK_FILE", "RUN_FILES", "RunFolder", "describe_error", "run_config_for"]
