from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mimkit.data import build_dataset
from mimkit.data.datasets import dataset_stats
from mimkit.engine import CONFIG_FILE, NonFiniteLossError, pretrain
from mimkit.engine.checkpoint import latest_checkpoint, list_checkpoints, load_state, load_weights
from mimkit.engine.logging import read_metrics
from mimkit.methods import METHODS
from mimkit.methods.mae import MAE
from mimkit.models import load_config, method_from_config

pytestmark = pytest.mark.fmnist

# 600 training images in batches of 32: 18 optimizer steps per epoch.
STEPS_PER_EPOCH = 18


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def _weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_tiny_pretrain(tiny_run_config):
    cfg = tiny_run_config("train.epochs=2")
    run = pretrain(cfg)
    assert str(run) == cfg.run_dir
    # the resolved config is saved and reads back to the same thing, with the normalisation it trained with
    saved = load_config(run / CONFIG_FILE)
    mean, std = dataset_stats(build_dataset(cfg.data, "train"), cfg.data)
    assert (saved.data.mean, saved.data.std) == (mean, std) and len(mean) == 1
    assert saved == dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=mean, std=std))
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(3, 2 * STEPS_PER_EPOCH + 1, 3))
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, losses
    # warmup, then cosine decay to ~0 at the end
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] and lrs[-1] < 0.01 * max(lrs)
    assert rows[-1]["epoch"] == pytest.approx(2.0)
    assert {"img_per_s", "elapsed_min", "skipped_images"} <= set(rows[0])
    # checkpoints: the end of epoch 1 and the end of the run (keep_last=2)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000018", "step_00000036"]
    state = load_state(ckpts[-1])
    assert state["step"] == 36 and state["total_steps"] == 36
    assert load_state(ckpts[0])["epoch"] == 1 and load_state(ckpts[0])["batch_in_epoch"] == 0
    method = method_from_config(cfg)
    load_weights(method, ckpts[-1])
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert (run / "train.log").is_file() and any((run / "tb").iterdir())


def test_resume_auto_continues(tiny_run_config):
    run = pretrain(tiny_run_config("train.epochs=1"))
    assert latest_checkpoint(run / "checkpoints").name == "step_00000018"
    pretrain(tiny_run_config("train.epochs=2"), resume="auto")
    # one continuous sequence of logged steps: the second call did not start again from 0
    assert _steps(run) == list(range(3, 37, 3))
    assert latest_checkpoint(run / "checkpoints").name == "step_00000036"
    # resuming a finished run does nothing
    before = _weights(latest_checkpoint(run / "checkpoints"))
    pretrain(tiny_run_config("train.epochs=2"), resume="auto")
    assert _steps(run) == list(range(3, 37, 3))
    after = _weights(latest_checkpoint(run / "checkpoints"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_from_before_stored_statistics_goes_on_without(tiny_run_config):
    """A run whose config.yaml has no data.mean continues as it was (the data's statistics, not refused)."""
    run = pretrain(tiny_run_config("train.epochs=1"))
    tree = yaml.safe_load((run / CONFIG_FILE).read_text())
    del tree["data"]["mean"], tree["data"]["std"]
    (run / CONFIG_FILE).write_text(yaml.safe_dump(tree, sort_keys=False))
    assert load_config(run / CONFIG_FILE).data.mean == []
    pretrain(tiny_run_config("train.epochs=2"), resume="auto")
    assert latest_checkpoint(run / "checkpoints").name == "step_00000036"
    assert load_config(run / CONFIG_FILE).data.mean == []


def test_resume_auto_without_checkpoint_starts_fresh(tiny_run_config):
    run = pretrain(tiny_run_config("train.epochs=0.5"), resume="auto")
    assert _steps(run) == [3, 6, 9]


@pytest.mark.parametrize("resume_step", [10, 25])
def test_resume_is_exact(tiny_run_config, tmp_path, resume_step):
    """Stopping at a checkpoint and resuming gives bit-identical weights to an uninterrupted run."""
    extra = ("train.epochs=2", "train.ckpt_every_steps=5", "train.keep_last=0")
    full = pretrain(tiny_run_config(*extra))
    names = [c.name for c in list_checkpoints(full / "checkpoints")]
    assert names == [f"step_{s:08d}" for s in (5, 10, 15, 18, 20, 25, 30, 35, 36)]
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for c in list_checkpoints(part / "checkpoints"):
        if int(c.name[5:]) > resume_step:
            shutil.rmtree(c)
    pretrain(tiny_run_config(*extra, run_dir=part), resume="auto")
    a = _weights(full / "checkpoints" / "step_00000036")
    b = _weights(part / "checkpoints" / "step_00000036")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa, sb = load_state(full / "checkpoints" / "step_00000036"), load_state(part / "checkpoints" / "step_00000036")
    assert sa["step"] == sb["step"] == 36


def test_fp16_overflows_lower_the_scale_and_resume_is_exact(tiny_run_config, tmp_path, monkeypatch):
    """fp16 with a gradient scaler: overflowed steps are skipped without counting as non-finite, and the
    scaler's state is checkpointed, so that a resumed run skips the same steps as an uninterrupted one."""
    import mimkit.engine.trainer as trainer_module

    # a first scale far too large: the first steps overflow and halve it
    monkeypatch.setattr(trainer_module, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        device.type, init_scale=2.0**24, growth_interval=4))
    extra = ("train.epochs=2", "train.precision=fp16", "train.ckpt_every_steps=5", "train.keep_last=0",
             "train.log_every=1", "train.max_bad_steps=2")
    full = pretrain(tiny_run_config(*extra))
    rows = [r for r in read_metrics(full) if "loss" in r]
    assert not [r for r in read_metrics(full) if "skipped_nonfinite" in r]
    scales = [r["loss_scale"] for r in rows]
    assert scales[0] < 2.0**24 and len(set(scales)) > 2, scales  # lowered by overflows, raised by growth
    assert rows[-1]["step"] == 36
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for c in list_checkpoints(part / "checkpoints"):
        if int(c.name[5:]) > 10:
            shutil.rmtree(c)
    assert "grad_scaler" in load_state(part / "checkpoints" / "step_00000010")
    pretrain(tiny_run_config(*extra, run_dir=part), resume="auto")
    a = _weights(full / "checkpoints" / "step_00000036")
    b = _weights(part / "checkpoints" / "step_00000036")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_from_explicit_checkpoint(tiny_run_config, tmp_path):
    first = pretrain(tiny_run_config("train.epochs=1"))
    ckpt = latest_checkpoint(first / "checkpoints")
    second = pretrain(tiny_run_config("train.epochs=1.5", run_dir=tmp_path / "second"), resume=str(ckpt))
    assert _steps(second) == [21, 24, 27]
    assert latest_checkpoint(second / "checkpoints").name == "step_00000027"


def test_max_minutes_stops_with_checkpoint(tiny_run_config):
    run = pretrain(tiny_run_config("train.epochs=5", "train.max_minutes=1e-9"))
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert load_state(latest_checkpoint(run / "checkpoints"))["batch_in_epoch"] == 1


def test_budget_minutes_fits_the_cosine_to_the_time(tiny_run_config):
    """The run stops at the budget with the learning rate annealed, whatever the machine's speed."""
    # a warmup of 50 epochs cannot fit in the budget: it is cut so the lr still peaks and anneals
    run = pretrain(tiny_run_config("train.epochs=1000", "train.budget_minutes=0.1", "train.log_every=1",
                                   "optim.warmup_epochs=50"))
    rows = [r for r in read_metrics(run) if "lr" in r]
    state = load_state(latest_checkpoint(run / "checkpoints"))
    assert 0.08 <= state["train_minutes"] < 0.2  # ended at the budget, not after 1000 epochs
    peak = max(r["lr"] for r in rows)
    assert peak > 0.9 * 8e-3 * 32 / 256  # the configured peak lr was reached
    assert rows[-1]["lr"] < 0.1 * peak  # the cosine had (nearly) ended when the time ran out
    assert rows[-1]["planned_steps"] < 1000 * 18


def test_accumulation_counts_steps(tiny_run_config):
    run = pretrain(tiny_run_config("train.epochs=1", "optim.accum_steps=2", "optim.batch_size=16",
                                   "train.log_every=1"))
    # 600 // 16 = 37 micro-batches per epoch, 18 optimizer steps
    assert _steps(run)[-1] == 18
    assert load_state(latest_checkpoint(run / "checkpoints"))["step"] == 18


def _nan_method(good_calls: int):
    class NanAfter(MAE):
        """MAE whose loss becomes NaN after ``good_calls`` forward passes."""

        Config = MAE.Config
        calls = 0

        def forward(self, images):
            out = super().forward(images)
            type(self).calls += 1
            if type(self).calls > good_calls + 100:  # fail instead of hanging if the guard is broken
                raise AssertionError("the non-finite guard never stopped the run")
            if type(self).calls > good_calls:
                out.loss = out.loss * float("nan")
            return out

    return NanAfter


def test_nan_guard_stops_and_keeps_checkpoints(tiny_run_config, monkeypatch):
    monkeypatch.setitem(METHODS, "nan_after", _nan_method(good_calls=10))
    cfg = tiny_run_config("method.name=nan_after", "train.epochs=2", "train.ckpt_every_steps=4",
                          "train.max_bad_steps=3", "train.log_every=1")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps at step 10"):
        pretrain(cfg)
    run = cfg.run_dir
    ckpts = list_checkpoints(Path(run) / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000008"]
    for c in ckpts:
        state = load_state(c)
        assert state["step"] == int(c.name[5:])
        assert all(torch.isfinite(w).all() for w in _weights(c).values())
    rows = read_metrics(ckpts[0].parent.parent)
    assert [r["skipped_nonfinite"] for r in rows if "skipped_nonfinite" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


def test_nan_guard_counts_consecutive_only(tiny_run_config, monkeypatch):
    """Isolated bad steps are skipped without stopping the run."""
    monkeypatch.setattr(_Flaky, "calls", 0)
    monkeypatch.setitem(METHODS, "flaky", _Flaky)
    cfg = tiny_run_config("method.name=flaky", "train.epochs=1", "train.max_bad_steps=2")
    run = pretrain(cfg)
    rows = read_metrics(run)
    skipped = [r["skipped_nonfinite"] for r in rows if "skipped_nonfinite" in r]
    # skipped steps do not count: the 18 optimizer steps of one epoch take 26 batches, 8 of them bad
    assert skipped == [1] * 8
    state = load_state(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 18
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 8)
    method = method_from_config(load_config(run / CONFIG_FILE, ["method.name=mae"]))
    load_weights(method, latest_checkpoint(run / "checkpoints"))
    assert all(torch.isfinite(p).all() for p in method.parameters())


class _Flaky(MAE):
    """MAE whose loss is +inf on every third forward pass."""

    Config = MAE.Config
    calls = 0

    def forward(self, images):
        out = super().forward(images)
        type(self).calls += 1
        if type(self).calls % 3 == 0:
            out.loss = out.loss * float("inf")
        return out


def test_logged_loss_excludes_skipped_steps(tiny_run_config, monkeypatch):
    monkeypatch.setattr(_Flaky, "calls", 0)
    monkeypatch.setitem(METHODS, "flaky", _Flaky)
    run = pretrain(tiny_run_config("method.name=flaky", "train.epochs=1", "train.max_bad_steps=2"))
    rows = read_metrics(run)
    assert any("skipped_nonfinite" in r for r in rows)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


def test_nan_in_first_micro_batch_is_skipped(tiny_run_config, monkeypatch):
    monkeypatch.setitem(METHODS, "nan_once", _nan_at_calls({3}))  # first micro-batch of step 2
    run = pretrain(tiny_run_config("method.name=nan_once", "train.epochs=1", "optim.accum_steps=2",
                                   "optim.batch_size=16"))
    rows = read_metrics(run)
    assert [r["skipped_nonfinite"] for r in rows if "skipped_nonfinite" in r] == [1]
    method = method_from_config(load_config(run / CONFIG_FILE, ["method.name=mae"]))
    load_weights(method, latest_checkpoint(run / "checkpoints"))
    assert all(torch.isfinite(p).all() for p in method.parameters())


def _nan_at_calls(bad: set[int]):
    class NanAt(MAE):
        Config = MAE.Config
        calls = 0

        def forward(self, images):
            out = super().forward(images)
            type(self).calls += 1
            if type(self).calls in bad:
                out.loss = out.loss * float("nan")
            return out

    return NanAt


def test_single_nan_step_is_skipped(tiny_run_config, monkeypatch):
    """Without accumulation one bad batch costs one skipped step and nothing else."""
    monkeypatch.setitem(METHODS, "nan_once", _nan_at_calls({4}))
    run = pretrain(tiny_run_config("method.name=nan_once", "train.epochs=1", "train.log_every=1"))
    rows = read_metrics(run)
    assert [(r["step"], r["skipped_nonfinite"]) for r in rows if "skipped_nonfinite" in r] == [(3, 1)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 19))
    method = method_from_config(load_config(run / CONFIG_FILE, ["method.name=mae"]))
    load_weights(method, latest_checkpoint(run / "checkpoints"))
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_failed_run_releases_its_log_handler(tiny_run_config, monkeypatch):
    monkeypatch.setitem(METHODS, "nan_after", _nan_method(good_calls=0))
    cfg = tiny_run_config("method.name=nan_after", "train.epochs=1", "train.max_bad_steps=1")
    mimkit_log = logging.getLogger("mimkit")
    before = list(mimkit_log.handlers)
    with pytest.raises(NonFiniteLossError):
        pretrain(cfg)
    leaked = [h for h in mimkit_log.handlers if h not in before]
    for h in leaked:  # clean up so that other tests are not affected
        mimkit_log.removeHandler(h)
        h.close()
    assert leaked == []


def test_accumulation_does_not_leak_across_epochs(tiny_run_config, monkeypatch):
    grads_before_forward: list[bool] = []

    class Spy(MAE):
        Config = MAE.Config

        def forward(self, images):
            grads_before_forward.append(any(p.grad is not None for p in self.parameters()))
            return super().forward(images)

    monkeypatch.setitem(METHODS, "spy", Spy)
    # 600 // 40 = 15 micro-batches per epoch (odd), accum 2: 7 steps and one left-over micro-batch
    run = pretrain(tiny_run_config("method.name=spy", "optim.batch_size=40", "optim.accum_steps=2",
                                   "train.epochs=2"))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 14
    # the first micro-batch of every optimizer step must start from zeroed gradients; the left-over
    # 15th micro-batch is not even run, so epoch 2 starts clean at the 15th forward
    assert grads_before_forward[:14] == [False, True] * 7
    assert len(grads_before_forward) == 28
    assert grads_before_forward[14] is False, "epoch 2 started with the left-over gradients of epoch 1"


def test_accumulation_gives_the_large_batch_gradient_and_lr(tiny_run_config):
    """Two micro-batches of 16 accumulate to the gradient of the 32-image batch mean, and the lr is
    scaled by the effective batch of 32 either way."""
    from mimkit.engine.distributed import DistInfo
    from mimkit.engine.trainer import Trainer

    small = Trainer(tiny_run_config("optim.batch_size=16", "optim.accum_steps=2"), DistInfo())
    large = Trainer(tiny_run_config("optim.batch_size=32"), DistInfo())
    assert small.schedule.peak_lr == large.schedule.peak_lr == pytest.approx(8e-3 * 32 / 256)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))

    from mimkit.data import Batch
    from mimkit.engine.step import forward_backward, train_step

    start = {k: v.clone() for k, v in small.method.state_dict().items()}
    torch.manual_seed(11)
    forward_backward(small.model, Batch(x[:16]), small.device, "fp32", scale=0.5, sync=False)
    forward_backward(small.model, Batch(x[16:]), small.device, "fp32", scale=0.5)
    # the large-batch loss with the very same masks: the mean over both halves
    large.method.load_state_dict(start)
    torch.manual_seed(11)
    loss = sum(large.method(x[i:i + 16]).loss for i in (0, 16)) / 2
    loss.backward()
    for (name, p), q in zip(small.method.named_parameters(), large.method.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the engine's step over the two micro-batches reports that mean loss
    small.method.load_state_dict(start)
    small.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    result = train_step(small.model, small.method, [Batch(x[:16]), Batch(x[16:])], small.optimizer,
                        device=small.device, precision="fp32", lr=1e-3, step=0, total_steps=10)
    assert result.taken and result.images == 32
    assert float(result.loss) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_accumulate_groups_micro_batches_and_drops_a_short_last_group():
    from mimkit.engine.trainer import accumulate

    groups = list(accumulate(iter(["a", "b", "c", "d", "e"]), 2, start=3))
    assert groups == [(5, ["a", "b"]), (7, ["c", "d"])]  # the batch index a resumed run restarts at
    assert list(accumulate(iter(["a", "b"]), 1, start=0)) == [(1, ["a"]), (2, ["b"])]
