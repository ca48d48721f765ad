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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mimkit.engine.logging import METRICS_FILE
from mimkit.errors import ConfigError, RunFolderError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
#: The settings a run was continued with where they differ from ``config.yaml`` (one JSON row per
#: continuation): ``config.yaml`` stays the record of how the run started.
CHANGES_FILE = "config-changes.jsonl"
#: What a run writes into its folder; ``--overwrite`` removes exactly these, and the fine-tunings
#: of its checkpoints (``finetune-*``), which belong to the run they started from.
RUN_FILES = (CONFIG_FILE, CHANGES_FILE, METRICS_FILE, "train.log", "tb", "checkpoints", "reconstructions.png",
             "views.png", "loss_curve.png")
#: The places inside a run folder that training writes, checked before the first step.
WRITTEN_BY_TRAINING = (CONFIG_FILE, CHANGES_FILE, METRICS_FILE, "train.log", "tb", "checkpoints")
DERIVED = "finetune-*"


def run_folder_of(path: str | Path) -> Path | None:
    """The folder of the run a path belongs to: the nearest of it and its three parents holding ``config.yaml``.

    A run folder, its ``checkpoints/``, one checkpoint, a checkpoint's ``model.safetensors``, an export
    folder, or a checkpoint copied out together with its run's ``config.yaml`` all resolve; None if
    no ``config.yaml`` is there.
    """
    path = Path(path)
    for folder in (path, *path.parents[:3]):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def run_config_for(ckpt: Path) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to (see :func:`run_folder_of`).

    Raises:
        ConfigError: No run config is found.

    """
    folder = run_folder_of(ckpt)
    if folder is None:
        raise ConfigError(f"no {CONFIG_FILE} found beside checkpoint {ckpt} or in its run folder; a checkpoint "
                          f"copied out of its run needs the run's {CONFIG_FILE} beside it")
    return folder / CONFIG_FILE


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON under a temporary name, then rename: a reader never sees half a file."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` under a temporary name, then rename: a reader (or a crash) never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def describe_error(err: OSError) -> str:
    """``err``'s cause in words, with the two a user must act on spelled out."""
    if err.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write there ({err.strerror})"
    return err.strerror or str(err)


def writable_problem(path: Path) -> str | None:
    """Why ``path`` could not be written, or None; nothing is left behind by the check.

    A folder (existing, or to be created) is probed by creating and removing a file in it, which is
    the test that holds for root and read-only mounts alike; an existing file is opened for
    appending without writing. A missing path is judged by its nearest existing parent. Whether the
    output fits is :func:`check_room`'s question: a full disk still takes an empty file.
    """
    path = Path(path)
    probe_dir, existing_file = path, None
    if path.is_symlink() and not path.exists():
        return f"{path} is a dangling symbolic link"
    if path.exists() and not path.is_dir():
        existing_file, probe_dir = path, path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is not a folder"
    try:
        if existing_file is not None:
            os.close(os.open(existing_file, os.O_WRONLY | os.O_APPEND))
        probe = probe_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return describe_error(err)
    return None


def check_writable(path: Path, what: str, hint: str) -> None:
    """Refuse, before any work, a place a command would write its output to.

    Args:
        path: A folder or file the command will write (it need not exist yet).
        what: What goes there, for the message (e.g. ``"results"``).
        hint: What the user can do instead.

    Raises:
        RunFolderError: ``path`` cannot be written, with the reason.

    """
    problem = writable_problem(path)
    if problem is not None:
        raise RunFolderError(f"cannot write {what} to {path}: {problem}; {hint}")


def check_room(path: Path, needed_bytes: int, what: str, hint: str) -> None:
    """Refuse, before the work, a disk without ``needed_bytes`` free where ``path`` (or its nearest parent) is.

    A probe file shows that a place may be written, not that what goes there fits; a command that
    knows the size of its output checks it here.

    Raises:
        RunFolderError: Naming the place, the free and the needed MiB.

    """
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise RunFolderError(f"{path}: {free / 2**20:.1f} MiB free, but {what} needs about "
                             f"{needed_bytes / 2**20:.1f} MiB; {hint}")


def lock_holders(lock: Path) -> list[int]:
    """The processes holding a ``flock`` on ``lock`` (from ``/proc/locks``; empty where it is not readable)."""
    try:
        st = os.stat(lock)
        table = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    # /proc/locks names a file as MAJOR:MINOR:INODE, the device numbers in hex.
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a blocked waiter's line has "->" first)
        if "FLOCK" in parts:
            at = parts.index("FLOCK")
            if len(parts) > at + 4 and parts[at + 4] == ident:
                pids.append(int(parts[at + 3]))
    return sorted(set(pids) - {os.getpid()})


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

    def _writer_pid(self) -> str:
        holders = lock_holders(self.path / LOCK_FILE)
        if holders:
            return ", ".join(map(str, holders))
        try:
            return (self.path / LOCK_FILE).read_text(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def _in_use_message(self) -> str:
        lock = self.path / LOCK_FILE
        try:  # a shared lock is granted only when every holder is a reader
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                readers = True
            except BlockingIOError:
                readers = False
            finally:
                os.close(fd)
        except OSError:
            readers = False
        if readers:
            pids = ", ".join(map(str, lock_holders(lock))) or "unknown"
            return (f"run folder {self.path} is being read by another mimkit command (pid {pids}: an evaluation, "
                    "fine-tuning or export of this run); wait for it to finish or choose another run_dir")
        return (f"run folder {self.path} is in use by another mimkit process (pid {self._writer_pid()}); wait for "
                "it to finish or choose another run_dir")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the run for reading: refuse at once while a process writes it, and keep writers out meanwhile.

        A reader takes a shared ``flock`` on the run's lock file: any number of readers at once,
        none beside a writer. So the checkpoint a command reads cannot be rotated away or replaced
        under it. A folder without a lock file (an export, a copied checkpoint) is read as it is.

        Raises:
            RunFolderError: A process is writing the run (its pid named).

        """
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"run {self.path} is being written by mimkit process (pid {self._writer_pid()}): its checkpoints "
                "are rotated while it trains, so this command could lose the one it reads; run it when training "
                f"has finished, or on a copy of a checkpoint with the run's settings (cp -r CHECKPOINT COPY && cp "
                f"{self.path / CONFIG_FILE} COPY/)") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def lock(self) -> None:
        """Create the folder if needed, take its lock and prove it writable.

        Raises:
            RunFolderError: The folder cannot be created or written, or another process holds it.

        """
        # Every place training writes is probed first: a refusal leaves the folder as it was.
        for name in ("", *WRITTEN_BY_TRAINING):
            problem = writable_problem(self.path / name)
            if problem is not None:
                where = f"run folder {self.path}" if not name else f"{self.path / name}"
                raise RunFolderError(f"cannot write {where}: {problem}; training writes there, so nothing was "
                                     "started: make it writable, or choose a writable run_dir")
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
        except OSError as err:
            self.release()
            raise RunFolderError(f"cannot write run folder {self.path}: {describe_error(err)}; "
                                 "choose a writable run_dir") from None

    def check_space(self, needed_bytes: int) -> None:
        """Refuse a disk without room for one checkpoint (``needed_bytes``), before training starts."""
        check_room(self.path, needed_bytes, "one checkpoint", "free space or choose another run_dir")

    def check_place(self) -> None:
        """Refuse a run folder that is a checkpoint, an export, or inside another run's ``checkpoints/``.

        Rotation deletes whatever lies in a run's checkpoints, and a checkpoint's or export's own
        ``model.safetensors`` would be read in place of the run's checkpoints by every command.

        Raises:
            RunFolderError: Naming what the folder is.

        """
        here = self.path.resolve()
        for parent in here.parents:
            if parent.name == "checkpoints" and (parent.parent / CONFIG_FILE).is_file():
                raise RunFolderError(f"run_dir {self.path} is inside the checkpoints of run {parent.parent}, which "
                                     "checkpoint rotation deletes; choose a run_dir outside it")
        for name, what in (("model.safetensors", "a checkpoint or an export"), ("encoder.json", "an export")):
            if (self.path / name).is_file():
                raise RunFolderError(f"run_dir {self.path} holds {what} ({name}), not a run; a run never replaces "
                                     "one, even with --overwrite: choose another run_dir")

    def check_derived_not_in_use(self) -> None:
        """Refuse to replace the run while one of its fine-tunings (``finetune-*``) is written or read.

        Raises:
            RunFolderError: Naming the fine-tuning folder and the process that holds it.

        """
        for derived in sorted(self.path.glob(DERIVED)):
            RunFolder(derived).check_not_in_use()

    def clear(self) -> list[str]:
        """Remove the previous run's files (``--overwrite``); returns what was removed.

        Raises:
            RunFolderError: A fine-tuning of the run is in use (nothing is removed then).

        """
        self.check_derived_not_in_use()
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


@contextmanager
def reading_run(path: str | Path | None) -> Iterator[None]:
    """:meth:`RunFolder.reading` for the run that ``path`` (a run, checkpoint or export) belongs to."""
    folder = run_folder_of(path) if path is not None else None
    if folder is None:
        yield
        return
    with RunFolder(folder).reading():
        yield


__all__ = ["CHANGES_FILE", "CONFIG_FILE", "LOCK_FILE", "RUN_FILES", "RunFolder", "check_room", "check_writable",
           "describe_error", "lock_holders", "reading_run", "run_config_for", "run_folder_of", "writable_problem",
           "write_json", "write_text"]
