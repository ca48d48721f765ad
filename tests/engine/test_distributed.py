"""Two CPU processes (gloo) against one: the same gradient, and a run that trains and checkpoints.

The processes are forked from the ``servers`` fixture's fork servers (as ``torch.multiprocessing.spawn``
would start them, without each interpreter's start) and given the environment torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the engine's own torchrun path runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import fake_run, tiny_tokenizer_settings

from mimkit.data import Batch, build_dataset
from mimkit.data.datasets import dataset_stats
from mimkit.engine.checkpoint import latest_checkpoint, list_checkpoints, load_state
from mimkit.engine.distributed import cleanup, init_distributed
from mimkit.engine.logging import read_metrics
from mimkit.engine.step import forward_backward, train_step
from mimkit.engine.trainer import Trainer, pretrain
from mimkit.models import load_config, method_from_config

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]

WORLD = 2
PER_RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(size: int = 28) -> Batch:
    gen = torch.Generator().manual_seed(7)
    return Batch(torch.randn(WORLD * PER_RANK, 1, size, size, generator=gen),
                 torch.randint(0, 10, (WORLD * PER_RANK,), generator=gen))


def _shard(batch: Batch, rank: int) -> Batch:
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return Batch(batch.images[part], batch.labels[part])


#: A tiny stride-2 CvT. Its projections' BatchNorm pools each rank's half of the batch, as the
#: single-process reference's one forward per rank does, so the gradients still agree.
CVT = ["backbone.name=cvt_tiny_s2", "backbone.dims=[16, 32, 64]", "backbone.num_heads=[1, 2, 2]",
       "backbone.depths=[1, 1, 1]"]


def _method_overrides(method: str, overrides: list[str]) -> list[str]:
    """The tiny run's settings for ``method`` (``name@cvt``: on a tiny CvT): the classifier takes none
    of MAE's decoder settings."""
    if method == "mae":
        return overrides
    decoder = [o for o in overrides if o.startswith("method.decoder")]
    if method == "mixmae":  # pairs within each rank's half of the batch, a two-stage Swin
        return [o for o in overrides if not o.startswith(("method.", "backbone."))] + [
            "backbone.name=swin_tiny_p2", "backbone.embed_dims=[16, 32]", "backbone.depths=[1, 1]",
            "backbone.num_heads=[1, 2]", "method.name=mixmae", *decoder]
    if method.startswith("data2vec"):  # masks (and v2's noise) from each rank's RNG, a teacher
        name, _, backbone = method.partition("@")
        drop = ("method.", "backbone.") if backbone else ("method.",)
        kept = [o for o in overrides if not o.startswith(drop)]
        if name == "data2vec2" and backbone:  # 2 x 2 visible blocks of 4 x 4 cells, as its config; hooked targets
            kept += ["method.mask_ratio=0.6", "method.block_size=2", "method.target_layer=ffn"]
        return kept + [f"method.name={name}"] + (CVT if backbone else [])
    if method == "vqvae":  # a k-means start and codebook sums over both ranks' tokens
        return [o for o in overrides if not o.startswith("method.")] + [
            "method.name=vqvae", "method.num_codes=16", "method.code_dim=8", "method.decoder_dim=16",
            "method.decoder_depth=1"]
    if method == "mixedae":  # one group of four per rank, 32 px images
        return [o for o in overrides if not o.startswith("method.")] + [
            "method.name=mixedae", *decoder, "data.img_size=32", "backbone.img_size=32"]
    tuned = [o for o in overrides if not o.startswith("method.")] + ["method.name=finetune", "method.num_classes=10"]
    return tuned + (["method.ema_decay=0.9"] if method == "finetune+ema" else [])


#: A tiny DINO: two global and two local views, a small head.
DINO = ["method.name=dino", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
        "method.views=[{count: 2}, {size: 12, scale: [0.1, 0.4], count: 2}]", "optim.weight_decay=0.04"]


def _dino_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("method.")] + DINO


def _views_batch() -> Batch:
    """The global batch as DINO's four views (two 28 px, two 12 px)."""
    gen = torch.Generator().manual_seed(11)
    n = WORLD * PER_RANK
    views = tuple(torch.randn(n, 1, s, s, generator=gen) for s in (28, 28, 12, 12))
    return Batch(views[0], None, views)


def _views_shard(batch: Batch, rank: int) -> Batch:
    views = tuple(v[rank * PER_RANK : (rank + 1) * PER_RANK] for v in batch.views)
    return Batch(views[0], None, views)


def _dino_step(trainer_or_method, model, optimizer, batch: Batch, info=None):
    return train_step(model, trainer_or_method, [batch], optimizer, device=torch.device("cpu"), precision="fp32",
                      lr=1e-3, step=0, total_steps=10, info=info)


def _dino_worker(rank: int, port: int, overrides: list[str], out: str) -> None:
    _as_rank(rank, port)
    info = init_distributed("cpu")
    try:
        trainer = Trainer(load_config(None, overrides), info)
        result = _dino_step(trainer.method, trainer.model, trainer.optimizer, _views_shard(_views_batch(), rank), info)
        torch.save({"loss": result.loss, "center": trainer.method.center.value.clone(),
                    "teacher": {n: p.clone() for n, p in trainer.method.teacher_encoder.named_parameters()}},
                   Path(out) / f"dino{rank}.pt")
    finally:
        cleanup(info)


def _as_rank(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _grad_worker(rank: int, port: int, overrides: list[str], out: str) -> None:
    _as_rank(rank, port)
    info = init_distributed("cpu")
    try:
        trainer = Trainer(load_config(None, overrides), info)
        torch.manual_seed(100 + rank)  # this rank's masks
        batch = _shard(_global_batch(trainer.cfg.data.img_size), rank)
        forward_backward(trainer.model, batch, trainer.device, trainer.precision)
        grads = {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}
        torch.save(grads, Path(out) / f"grads{rank}.pt")
        torch.save((trainer.cfg.data.mean, trainer.cfg.data.std), Path(out) / f"stats{rank}.pt")
    finally:
        cleanup(info)


def _run_worker(rank: int, port: int, overrides: list[str]) -> None:
    _as_rank(rank, port)
    pretrain(load_config(None, overrides))


@pytest.mark.parametrize("method", ["mae", "finetune", "finetune+ema", "mixmae", "mixedae", "data2vec",
                                    "data2vec2", "data2vec@cvt", "data2vec2@cvt", "vqvae", "beit"])
def test_two_process_gradient_equals_single_process_gradient(tmp_path, tiny_run_overrides, method, servers):
    """DDP must average the ranks' gradients: with each rank's loss the mean over its half of the
    global batch, the result is the gradient of the global-batch mean (lightly's issue 1528 was a
    gradient off by the world size). Fine-tuning, with labels in the batch, too, and with a weight
    average, whose copy must not be a parameter DDP waits for. A tokenizer starts its codebook from
    both ranks' tokens, as one process does from the whole batch; BEiT's frozen tokenizer is no
    parameter DDP waits for."""
    if method == "beit":
        tokenizer = fake_run(tmp_path / "tokenizer", tiny_tokenizer_settings())
        tiny_run_overrides = [o for o in tiny_run_overrides if not o.startswith("method.")] + [
            "method.name=beit", f"method.tokenizer={tokenizer}"]
    overrides = [f"run_dir={tmp_path / 'ddp'}", *_method_overrides(method, tiny_run_overrides)]
    cfg = load_config(None, overrides)
    servers.spawn(_grad_worker, (_free_port(), overrides, str(tmp_path)), WORLD, tmp_path)
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD))
    # Rank 0 computes the normalisation and shares it: every rank has one process's, bit for bit.
    single = dataset_stats(build_dataset(cfg.data, "train"), cfg.data)
    assert [torch.load(tmp_path / f"stats{r}.pt") for r in range(WORLD)] == [single] * WORLD

    torch.manual_seed(cfg.seed)  # rank 0's initialisation, which DDP broadcasts to every rank
    model = method_from_config(cfg)
    model.load_helpers()
    if method == "vqvae":  # one codebook from the whole batch: one forward of it, rank 0's random choices
        torch.manual_seed(100)
        model(_global_batch(cfg.data.img_size)).loss.backward()
    for rank in range(WORLD if method != "vqvae" else 0):
        torch.manual_seed(100 + rank)
        (model(_shard(_global_batch(cfg.data.img_size), rank)).loss / WORLD).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert g0.keys() == ref.keys() and len(ref) > 10
    for name, grad in ref.items():
        torch.testing.assert_close(g0[name], grad, rtol=1e-4, atol=1e-6, msg=f"rank 0 gradient of {name}")
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=f"ranks disagree on {name}")


def test_dino_two_processes_compute_the_centre_loss_and_teacher_of_one(tmp_path, tiny_run_overrides, servers):
    """The centre is the mean teacher output over every rank's images (all-reduced in after_step): one
    step on two processes with half the batch each gives the one-process centre, loss and teacher."""
    overrides = [f"run_dir={tmp_path / 'ddp'}", *_dino_overrides(tiny_run_overrides)]
    cfg = load_config(None, overrides)
    servers.spawn(_dino_worker, (_free_port(), overrides, str(tmp_path)), WORLD, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"dino{r}.pt") for r in range(WORLD))

    from mimkit.engine.optim import build_optimizer, scaled_lr

    torch.manual_seed(cfg.seed)  # rank 0's initialisation, which DDP broadcasts to every rank
    method = method_from_config(cfg).train()
    optimizer = build_optimizer(method, cfg.optim, scaled_lr(cfg.optim, WORLD))
    one = _dino_step(method, method, optimizer, _views_batch())
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, one.loss, rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["loss"], r1["loss"])  # each rank's own half
    for r in (r0, r1):
        torch.testing.assert_close(r["center"], method.center.value, rtol=1e-5, atol=1e-7)
        for name, p in method.teacher_encoder.named_parameters():
            torch.testing.assert_close(r["teacher"][name], p, rtol=1e-4, atol=1e-6, msg=f"teacher {name}")


def test_two_process_run_trains_and_checkpoints(tmp_path, tiny_run_overrides, servers):
    run = tmp_path / "ddp_run"
    overrides = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1", "train.log_every=1"]
    servers.spawn(_run_worker, (_free_port(), overrides), WORLD, tmp_path)
    # 600 images over 2 ranks in batches of 32 per rank: 9 steps of 64 images
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and latest_checkpoint(run / "checkpoints").name == "step_00000009"
    assert load_state(ckpts[-1])["step"] == 9
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))  # one writer: each step logged once
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["lr"] < rows[len(rows) // 2]["lr"]


def test_two_process_time_budget_stops_every_rank_at_the_same_step(tmp_path, tiny_run_overrides, servers):
    """Each rank has its own clock; rank 0 decides the schedule and the stop, or the ranks would hang."""
    run = tmp_path / "ddp_budget"
    overrides = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1000", "train.budget_minutes=0.05"]
    servers.spawn(_run_worker, (_free_port(), overrides), WORLD, tmp_path)
    state = load_state(latest_checkpoint(run / "checkpoints"))
    assert 0.04 <= state["train_minutes"] < 0.25 and state["step"] < 1000 * 9
