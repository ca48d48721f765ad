"""A run is continued under its own settings; the few that may change are recorded, never overwritten."""

from __future__ import annotations

import hashlib
import json

import pytest

from mimkit.engine import pretrain
from mimkit.engine.checkpoint import list_checkpoints
from mimkit.engine.continuation import CONTINUABLE, differences, flat_settings, run_settings
from mimkit.errors import ConfigError
from mimkit.models import load_config

pytestmark = pytest.mark.fmnist


def _digest(root):
    return {str(p.relative_to(root)): p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_a_longer_schedule_is_recorded_beside_the_untouched_config(tmp_path, tiny_run_overrides):
    run = tmp_path / "run"
    settings = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1"]
    pretrain(load_config(None, settings))
    record = (run / "config.yaml").read_bytes()
    pretrain(load_config(None, [*settings, "train.epochs=2"]), resume="auto")
    assert (run / "config.yaml").read_bytes() == record, "config.yaml is the record of how the run started"
    rows = [json.loads(line) for line in (run / "config-changes.jsonl").read_text().splitlines()]
    assert rows == [{"step": 18, "date": rows[0]["date"], "changes": {"train.epochs": {"from": 1.0, "to": 2.0}}}]
    assert run_settings(run).train.epochs == 2.0
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_00000036"
    # The run's settings now include the change: continuing with them again records nothing new.
    pretrain(load_config(None, [*settings, "train.epochs=2"]), resume="auto")
    assert len((run / "config-changes.jsonl").read_text().splitlines()) == 1


def test_a_refused_continuation_changes_nothing(tmp_path, tiny_run_overrides):
    run = tmp_path / "run"
    settings = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1", "train.ckpt_every_steps=6",
                "train.keep_last=0"]
    pretrain(load_config(None, settings))
    before = _digest(run)
    with pytest.raises(ConfigError, match=r"train\.keep_last: run 0, now 1\)"):
        pretrain(load_config(None, [*settings, "train.keep_last=1"]), resume="auto")
    with pytest.raises(ConfigError, match=r"optim\.base_lr: run 0\.008, now 0\.001"):
        pretrain(load_config(None, [*settings, "optim.base_lr=1e-3", "train.epochs=2"]), resume="auto")
    assert _digest(run) == before
    assert len(list_checkpoints(run / "checkpoints")) == 3, "a smaller keep_last must not prune the run"


def test_method_defaults_count_as_the_same_setting():
    """Writing a method's default out is not a change; a real change is, and only those keys are named."""
    plain = load_config(None, [])
    explicit = load_config(None, ["method.mask_ratio=0.75"])
    assert flat_settings(plain)["method.mask_ratio"] == 0.75
    assert differences(plain, explicit) == {}
    assert differences(plain, load_config(None, ["method.mask_ratio=0.5", "run_dir=elsewhere"])) == {
        "method.mask_ratio": (0.75, 0.5)}


def test_every_continuable_setting_exists():
    keys = flat_settings(load_config(None, []))
    assert set(CONTINUABLE) <= set(keys)
    assert "train.keep_last" not in CONTINUABLE and "train.precision" not in CONTINUABLE


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, tiny_run_overrides):
    """The steps after the checkpoint resumed from are abandoned: their checkpoints are kept, never picked."""
    run = tmp_path / "run"
    settings = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1", "train.ckpt_every_steps=6"]
    pretrain(load_config(None, settings))
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step_00000012", "step_00000018"]
    pretrain(load_config(None, [*settings, "train.epochs=0.5"]), resume=str(run / "checkpoints" / "step_00000012"))
    assert (run / "checkpoints" / "superseded-step_00000018").is_dir()
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_00000012"
