"""The run folder: what counts as a run, the lock against a second writer, replacing a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mimkit.engine.logging import truncate_metrics
from mimkit.engine.run_folder import LOCK_FILE, RunFolder, writable_problem
from mimkit.errors import RunFolderError


def test_a_second_writer_is_refused_until_the_first_lets_go(tmp_path):
    first, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    first.lock()
    assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(RunFolderError, match=rf"in use by another mimkit process \(pid {os.getpid()}\)"):
        second.lock()
    with pytest.raises(RunFolderError, match="in use"):
        second.check_not_in_use()
    first.release()
    second.lock()
    second.release()


def test_a_dead_writer_leaves_no_lock(tmp_path):
    """flock dies with its process, even by kill -9: a crashed run can be resumed at once."""
    code = ("import os, signal, sys; from mimkit.engine.run_folder import RunFolder; "
            "RunFolder(sys.argv[1]).lock(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")]).returncode == -9
    RunFolder(tmp_path / "run").check_not_in_use()
    RunFolder(tmp_path / "run").lock()


def test_contents_and_clear_keep_baselines_and_drop_finetunings(tmp_path):
    run = RunFolder(tmp_path)
    assert run.contents() == []
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "baseline-pixels").mkdir()
    (tmp_path / "finetune-fmnist" / "checkpoints").mkdir(parents=True)
    assert run.contents() == ["metrics.jsonl", "checkpoints (1)"]
    # the fine-tunings of a replaced run's checkpoints go with it; baselines depend on the data alone
    assert run.clear() == ["metrics.jsonl", "checkpoints (1)", "finetune-fmnist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline-pixels"]


def test_space_check_names_the_sizes(tmp_path):
    with pytest.raises(RunFolderError, match=r"MiB free, but one checkpoint needs about .* MiB"):
        RunFolder(tmp_path).check_space(1 << 62)


def test_truncate_metrics_drops_the_rows_a_resume_redoes(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    assert truncate_metrics(tmp_path, 4) == 5
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3, 4]


def test_readers_share_a_run_and_exclude_its_writer(tmp_path):
    """A reading command is refused beside a writer, and a writer is refused beside a reader."""
    writer = RunFolder(tmp_path / "run")
    writer.lock()
    with pytest.raises(RunFolderError, match=rf"being written by mimkit process \(pid {os.getpid()}\)"):
        with RunFolder(tmp_path / "run").reading():
            pass
    writer.release()
    with RunFolder(tmp_path / "run").reading(), RunFolder(tmp_path / "run").reading():  # readers share
        with pytest.raises(RunFolderError, match="being read by another mimkit command"):
            RunFolder(tmp_path / "run").lock()
    RunFolder(tmp_path / "run").lock()


def test_a_folder_without_a_lock_file_is_read_as_it_is(tmp_path):
    with RunFolder(tmp_path / "export").reading():
        pass
    assert not (tmp_path / "export").exists(), "reading creates nothing"


def test_writable_problem_probes_without_leaving_anything(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert writable_problem(tmp_path / "new" / "deeper") is None
    assert writable_problem(tmp_path / "afile") is None
    assert "is not a folder" in writable_problem(tmp_path / "afile" / "below")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "dangling symbolic link" in writable_problem(tmp_path / "dangling")
    (tmp_path / "sys").symlink_to("/sys/kernel")  # not writable even by root
    assert "no permission" in writable_problem(tmp_path / "sys")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling", "sys"]
