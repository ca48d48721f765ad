"""Kill a real training process with SIGKILL mid-run, resume it, and get the uninterrupted weights."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from cli_forkserver import ForkedCommand, ForkServers
from conftest import fake_run, tiny_tokenizer_settings
from safetensors.torch import load_file

from mimkit.engine.checkpoint import latest_checkpoint, list_checkpoints, load_state

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]


def _argv(run: Path, overrides: list[str], resume: bool) -> list[str]:
    argv = ["pretrain", f"run_dir={run}", *overrides, "train.epochs=2", "train.ckpt_every_steps=4",
            "train.keep_last=0", "train.deterministic=true"]
    return argv + (["--resume", "auto"] if resume else [])


def _kill_after_third_checkpoint(servers: ForkServers, run: Path, overrides: list[str], log: Path) -> ForkedCommand:
    """Start the run and SIGKILL it as soon as its third periodic checkpoint exists, wherever it is
    then (between steps, inside a step, or writing the next checkpoint); the killed command."""
    proc = servers.start(_argv(run, overrides, False), log.parent, timeout=300, log=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.running():
            if (run / "checkpoints").is_dir() and len(list_checkpoints(run / "checkpoints")) >= 3:
                break
            time.sleep(0.01)
        proc.kill()
    finally:
        rc, _, err = proc.wait()
    assert rc == -signal.SIGKILL, f"the run ended with exit {rc} before it could be killed: {err}"
    return proc


#: A tiny DINO (teacher, centre and schedules in the state; four views per image from the loader).
DINO = ["method.name=dino", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
        "method.freeze_last_layer=0.2", "method.views=[{count: 2, jitter: 0.8}, {size: 12, count: 2}]"]


#: A tiny MixMAE on a two-stage Swin (pair masks from the global RNG, mix embeddings).
MIXMAE = ["backbone.name=swin_tiny_p2", "backbone.embed_dims=[16, 32]", "backbone.depths=[1, 1]",
          "backbone.num_heads=[1, 2]", "method.name=mixmae", "method.decoder_dim=32", "method.decoder_depth=1",
          "method.decoder_heads=2"]


#: A tiny three-stage CvT (BatchNorm statistics, pixel masks on its last-stage grid).
CVT = ["backbone.name=cvt_tiny_s2", "backbone.dims=[16, 32, 64]", "backbone.num_heads=[1, 2, 2]",
       "backbone.depths=[1, 1, 1]"]


def _overrides(method: str, tiny: list[str]) -> list[str]:
    """The tiny run's settings for ``method`` (``name@cvt``: on the CvT)."""
    if method.endswith("@cvt"):
        return [o for o in _overrides(method.removesuffix("@cvt"), tiny) if not o.startswith("backbone.")] + CVT
    if method in ("dino", "ibot"):  # iBOT: DINO's state, a second centre and block masks from the global RNG
        return [o for o in tiny if not o.startswith("method.")] + [f"method.name={method}", *DINO[1:]]
    if method == "mixmae":
        return [o for o in tiny if not o.startswith(("method.", "backbone."))] + MIXMAE
    if method in ("data2vec", "data2vec2"):  # a teacher on a linear decay, masks from the global RNG
        return [o for o in tiny if not o.startswith("method.")] + [f"method.name={method}"]
    if method == "vqvae":  # a k-means start and dead-code restarts from the global RNG, codebook buffers
        return [o for o in tiny if not o.startswith("method.")] + [
            "method.name=vqvae", "method.num_codes=16", "method.code_dim=8", "method.decoder_dim=16",
            "method.decoder_depth=1", "method.dead_threshold=2.0"]
    if method == "mixedae":  # group assignments from the global RNG, a segment embedding, a projector
        return [o for o in tiny if not o.startswith("method.")] + [
            "method.name=mixedae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
            "method.projector_dim=16", "data.img_size=32", "backbone.img_size=32"]
    return tiny


@pytest.mark.parametrize("method", ["mae", "dino", "ibot", "mixmae", "mixedae", "data2vec",
                                    "data2vec2", "data2vec@cvt", "data2vec2@cvt", "vqvae", "beit"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_run_overrides, method, servers):
    if method == "beit":  # masks from the global RNG, a frozen tokenizer from its own run
        tokenizer = fake_run(tmp_path / "tokenizer", tiny_tokenizer_settings())
        tiny_run_overrides = [o for o in tiny_run_overrides if not o.startswith("method.")] + [
            "method.name=beit", f"method.tokenizer={tokenizer}"]
    tiny_run_overrides = _overrides(method, tiny_run_overrides)
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted run beside the killed one, each forked by its own server (one thread, one core
    # each): they share nothing.
    uninterrupted = servers.start(_argv(full, tiny_run_overrides, False), tmp_path, timeout=300,
                                  log=tmp_path / "full")
    try:
        dead = _kill_after_third_checkpoint(servers, killed, tiny_run_overrides, tmp_path / "killed")
        stopped_at = load_state(latest_checkpoint(killed / "checkpoints"))["step"]
        assert 0 < stopped_at < 36
        resumed = servers.start(_argv(killed, tiny_run_overrides, True), tmp_path, timeout=300,
                                log=tmp_path / "resumed")
        rc, _, err = resumed.wait()
        assert rc == 0, err
        # Three processes, as three interpreters were: no state of the killed one survives into the resume.
        assert len({uninterrupted.proc.pid, dead.proc.pid, resumed.proc.pid}) == 3
    finally:
        full_rc, _, full_err = uninterrupted.wait()
    assert full_rc == 0, full_err
    a = load_file(str(latest_checkpoint(full / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(killed / "checkpoints") / "model.safetensors"))
    assert latest_checkpoint(killed / "checkpoints").name == "step_00000036"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed from step {stopped_at}; these weights differ: {differ}"
