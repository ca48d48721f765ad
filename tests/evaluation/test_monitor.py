"""``train.eval_every``: kNN while pre-training, logged to metrics.jsonl and TensorBoard, not perturbing the run."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimkit.engine import pretrain
from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.engine.logging import read_metrics
from mimkit.errors import MimkitError
from mimkit.evaluation.monitor import KnnMonitor
from mimkit.viz import save_loss_curve

pytestmark = pytest.mark.fmnist

WATCH = ("train.eval_every=6", "train.eval_fraction=0.01")


def _weights(run):
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def test_a_watched_run_logs_knn_and_trains_as_an_unwatched_one(tiny_run_config, tmp_path):
    """18 steps watched every 6: kNN at 6, 12 and 18, in the log and TensorBoard; the same weights as unwatched."""
    watched = pretrain(tiny_run_config("train.epochs=1", *WATCH))
    rows = [r for r in read_metrics(watched) if "knn20" in r]
    assert [r["step"] for r in rows] == [6, 12, 18]
    assert all(0.0 <= r["knn20"] <= 100.0 for r in rows)
    # 1 % of each of Fashion-MNIST's ten classes: 600 bank, 100 query images
    assert (rows[0]["knn_bank"], rows[0]["knn_queries"]) == (600, 100)
    events = EventAccumulator(str(watched / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn20")] == [6, 12, 18]
    png = save_loss_curve(watched).read_bytes()
    assert int.from_bytes(png[16:20], "big") > 1000, "the curve has its kNN panel beside the loss"
    plain = pretrain(tiny_run_config("train.epochs=1", run_dir=tmp_path / "plain"))
    a, b = _weights(watched), _weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a), "watching changed the training"


def test_the_monitor_scores_features_that_separate_the_classes(tiny_run_config):
    """Raw pixels through a flattening encoder: well above chance, so the bank and queries keep their labels."""
    cfg = tiny_run_config()

    class Pixels(torch.nn.Module):
        def forward_features(self, x):
            return x.flatten(1)

        def forward_head(self, x, pre_logits=True):
            return x

    monitor = KnnMonitor(cfg.data, 0.02, torch.device("cpu"), "fp32")
    assert monitor(Pixels())["knn20"] > 50.0


def test_eval_every_on_unlabelled_images_is_refused_in_one_line(tiny_run_config, tmp_path, write_image):
    for i in range(40):
        write_image(tmp_path / "flat" / f"{i}.png", value=i * 5, size=(28, 28), mode="L")
    cfg = tiny_run_config("data.name=unlabelled", f"data.root={tmp_path / 'flat'}", "data.subset_fraction=1", *WATCH)
    with pytest.raises(MimkitError, match=r"dataset unlabelled has no labels; train\.eval_every .* needs a labelled"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder"


@pytest.mark.parametrize("setting", ["train.eval_every=-1", "train.eval_fraction=0", "train.eval_fraction=1.5"])
def test_bad_watch_settings_are_refused(tiny_run_config, setting):
    with pytest.raises(MimkitError, match=setting.split("=")[0].replace(".", r"\.")):
        tiny_run_config(setting)


def test_a_run_mirrors_to_weights_and_biases_through_tensorboard(tiny_run_config, monkeypatch):
    """train.wandb: one W&B run per run folder, started before TensorBoard's writer, finished at the end;
    a continuation goes on in the same W&B run. A stand-in module records the calls (no network)."""
    import sys
    import types

    calls = []

    class FakeRun:
        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = pretrain(tiny_run_config("train.epochs=1", "train.wandb=mimkit-test"))
    pretrain(tiny_run_config("train.epochs=2", "train.wandb=mimkit-test"), resume="auto")
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and [c[0] for c in calls].count("finish") == 2
    assert all(kw["project"] == "mimkit-test" and kw["sync_tensorboard"] and kw["resume"] == "allow" for kw in inits)
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["dir"] == str(run)
    assert inits[0]["config"]["method"]["name"] == "mae"


def test_weights_and_biases_not_installed_is_refused_in_one_line(tiny_run_config, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(MimkitError, match=r"train\.wandb=p mirrors the run to Weights & Biases, which is not "
                                          r"installed: pip install 'mimkit\[wandb\]'"):
        pretrain(tiny_run_config("train.wandb=p"))
    assert not (tmp_path / "run").exists()
