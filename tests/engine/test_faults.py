"""Every fault ends in a resumable run: resuming after it gives the weights of an uninterrupted run.

Faults: a run stopped by NaN losses, a finite loss that produced non-finite weights, a corrupt
newest checkpoint (three ways), a full disk (a write that fails, and a real full tmpfs), and a
``kill -9`` in the middle of writing a checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mimkit.engine.checkpoint as checkpoint_module
from mimkit.cli import main
from mimkit.engine import NonFiniteLossError, pretrain
from mimkit.engine.checkpoint import latest_checkpoint, list_checkpoints
from mimkit.engine.logging import read_metrics
from mimkit.errors import NonFiniteError, RunFolderError
from mimkit.methods.mae import MAE
from mimkit.models import load_config

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]

# 2 epochs of 18 steps, a checkpoint every 4 steps, all kept; deterministic kernels.
FAULT_RUN = ["train.epochs=2", "train.ckpt_every_steps=4", "train.keep_last=0", "train.deterministic=true"]
FINAL = "step_00000036"


def _settings(run: Path, tiny: list[str]) -> list[str]:
    return [f"run_dir={run}", *tiny, *FAULT_RUN]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == FINAL, ckpt
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"these weights differ from the uninterrupted run: {differ}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the uninterrupted run every fault test must reproduce."""
    from conftest import TINY_RUN_OVERRIDES

    run = tmp_path_factory.mktemp("reference") / "run"
    pretrain(load_config(None, _settings(run, list(TINY_RUN_OVERRIDES))))
    return _final_weights(run)


def _all_checkpoints_finite(run: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for c in list_checkpoints(run / "checkpoints")
               for t in load_file(str(c / "model.safetensors")).values())


def test_nan_stop_then_resume(tmp_path, tiny_run_overrides, reference, monkeypatch):
    calls = {"n": 0}
    forward = MAE.forward

    def nan_from_call_10(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] >= 10:
            out.loss = out.loss * float("nan")
        return out

    cfg = load_config(None, [*_settings(tmp_path / "run", tiny_run_overrides), "train.max_bad_steps=3"])
    monkeypatch.setattr(MAE, "forward", nan_from_call_10)
    with pytest.raises(NonFiniteLossError,
                       match="at step 9; stopping. The last checkpoint, .*step_00000008, was checked finite"):
        pretrain(cfg)
    monkeypatch.undo()
    pretrain(cfg, resume="auto")
    _assert_same(reference, _final_weights(tmp_path / "run"))


@pytest.mark.parametrize("poison_after", [5, 7], ids=["found-at-log-step", "found-at-checkpoint"])
def test_nonfinite_update_from_finite_loss(tmp_path, tiny_run_overrides, reference, monkeypatch, poison_after):
    """A finite loss whose update leaves NaN weights: the run stops, no NaN checkpoint is written."""
    after_step = MAE.after_step

    def poison(self, step, total_steps):
        after_step(self, step, total_steps)
        if step == poison_after:
            with torch.no_grad():
                next(self.encoder.parameters()).view(-1)[0] = float("nan")

    cfg = load_config(None, _settings(tmp_path / "run", tiny_run_overrides))
    monkeypatch.setattr(MAE, "after_step", poison)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        pretrain(cfg)
    monkeypatch.undo()
    assert _all_checkpoints_finite(tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000004"
    pretrain(cfg, resume="auto")
    _assert_same(reference, _final_weights(tmp_path / "run"))


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _nan_weights(ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, str(ckpt / "model.safetensors"))


def _garbage_state(ckpt: Path) -> None:
    (ckpt / "state.pt").write_bytes(os.urandom(256))


@pytest.mark.parametrize("damage", [_truncate, _nan_weights, _garbage_state], ids=["truncated", "nan", "garbage"])
def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path, tiny_run_overrides, reference, damage, caplog):
    cfg = load_config(None, _settings(tmp_path / "run", tiny_run_overrides))
    pretrain(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    damage(ckpts / FINAL)
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        pretrain(cfg, resume="auto")
    assert any("skipping unusable checkpoint" in r.message and FINAL in r.message for r in caplog.records)
    assert (ckpts / f"corrupt-{FINAL}").is_dir(), "the damaged checkpoint must be kept, set aside"
    _assert_same(reference, _final_weights(tmp_path / "run"))


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_run_overrides, reference, monkeypatch,
                                                          capsys):
    """A full disk at the third checkpoint: one line, exit 2, the second checkpoint intact, exact resume."""
    calls = {"n": 0}
    real = checkpoint_module.write_file

    def full_disk_on_third_checkpoint(path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # two files a checkpoint: the weights of the third
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    settings = _settings(tmp_path / "run", tiny_run_overrides)
    monkeypatch.setattr(checkpoint_module, "write_file", full_disk_on_third_checkpoint)
    assert main(["pretrain", *settings]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and "step_00000008 is intact" in err[0], err
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000008"]
    assert main(["pretrain", *settings, "--resume", "auto"]) == 0
    _assert_same(reference, _final_weights(tmp_path / "run"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 1000 KiB, room for two of the tiny run's checkpoints (skipped where it cannot be mounted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk(small_tmpfs, tiny_run_overrides, reference, servers, tmp_path):
    run = small_tmpfs / "run"
    argv = ["pretrain", *_settings(run, tiny_run_overrides)]
    rc, _, err = servers.run(argv, tmp_path, log=tmp_path / "full")  # its output off the full disk
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1, err
    assert "the disk is full" in errors[0] and "Traceback" not in err, err
    done = list_checkpoints(run / "checkpoints")
    assert [c.name for c in done] == ["step_00000004", "step_00000008"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    rc, _, err = servers.run([*argv, "--resume", "auto"], tmp_path, log=tmp_path / "resumed")
    assert rc == 0, err
    _assert_same(reference, _final_weights(run))


# The child dies by SIGKILL in the middle of writing its third checkpoint's weights.
_DIE_IN_THIRD_WRITE = """
import os, signal, sys
import mimkit.engine.checkpoint as c
real, calls = c.write_file, [0]
def dying(path, data):
    calls[0] += 1
    if calls[0] == 5:  # two files a checkpoint: the weights of the third
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
c.write_file = dying
from mimkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write(tmp_path, tiny_run_overrides, reference, servers):
    run = tmp_path / "run"
    settings = ["pretrain", *_settings(run, tiny_run_overrides)]
    rc, _, err = servers.run(settings, tmp_path, log=tmp_path / "dying", code=_DIE_IN_THIRD_WRITE)
    assert rc == -9, err
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004", "step_00000008"]
    assert list(ckpts.glob(".tmp-step_00000012-*")), "the kill should have left a half-written temporary"
    rc, _, err = servers.run([*settings, "--resume", "auto"], tmp_path, log=tmp_path / "resumed")
    assert rc == 0, err
    assert not list(ckpts.glob(".tmp-*")), "the resumed run should remove the dead run's temporary"
    _assert_same(reference, _final_weights(run))


def test_overwrite_replaces_a_run_and_keeps_baselines(tmp_path, tiny_run_overrides):
    settings = _settings(tmp_path / "run", tiny_run_overrides)
    cfg = load_config(None, settings)
    pretrain(cfg)
    (tmp_path / "run" / "baseline-pixels").mkdir()
    (tmp_path / "run" / "baseline-pixels" / "knn.json").write_text("{}")
    with pytest.raises(RunFolderError, match="already holds a run"):
        pretrain(cfg)
    short = load_config(None, [*settings, "train.epochs=0.5"])
    pretrain(short, overwrite=True)
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000004",
                                                                                     "step_00000008",
                                                                                     "step_00000009"]
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == sorted(steps) and max(steps) == 9, "the old run's log rows must be gone"
    assert (tmp_path / "run" / "baseline-pixels" / "knn.json").is_file()
