"""The teacher's targets: DINO's moving centre and DINOv2's Sinkhorn-Knopp, behind one interface."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import four_views, tiny_teacher_student
from safetensors.torch import save_file

from mimkit.engine.checkpoint import MODEL_FILE, build_for_weights, read_weights
from mimkit.errors import ConfigError
from mimkit.methods import check_method_cfg
from mimkit.methods.centering import Center, SinkhornKnopp, make_centering


def test_the_centre_moves_to_the_mean_of_a_whole_step_and_forgets_a_skipped_one():
    c = Center(3, momentum=0.5)
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    c.add(a)
    c.add(b)  # two micro-batches of one step: the mean of all three rows
    c.update()
    torch.testing.assert_close(c.value, 0.5 * torch.cat([a, b]).mean(0, keepdim=True))
    before = c.value.clone()
    c.add(torch.full((2, 3), 100.0))
    c.discard()  # the engine skipped the step
    c.update()
    assert torch.equal(c.value, before)
    probs = c.probs(torch.zeros(2, 3), 0.1)
    torch.testing.assert_close(probs, torch.softmax(-before / 0.1, -1).expand(2, 3))


def test_a_patch_centre_averages_per_image_means():
    c = Center(4, momentum=0.0, ndim=3)
    patch = torch.randn(2, 5, 4)
    c.add(patch.mean(1))
    c.update()
    torch.testing.assert_close(c.value, patch.mean(1).mean(0).view(1, 1, 4))


def test_sinkhorn_knopp_balances_the_prototypes_over_the_batch():
    # A fixed draw: on about 1 draw in 20 the raw softmax is balanced enough by chance to fail the ratio below.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g) * 3 + torch.arange(8.0)  # prototype 7 dominates the raw softmax
    p = SinkhornKnopp(iterations=50).probs(logits, 0.5)
    torch.testing.assert_close(p.sum(-1), torch.ones(64))
    torch.testing.assert_close(p.sum(0), torch.full((8,), 8.0), rtol=1e-3, atol=0.0)
    raw = torch.softmax(logits / 0.5, -1).sum(0)
    three = SinkhornKnopp().probs(logits, 0.5).sum(0)  # DINOv2's three iterations: most of the way
    assert raw.max() / raw.min() > 10 * (three.max() / three.min())
    patches = SinkhornKnopp().probs(torch.randn(2, 5, 8), 0.1)
    assert patches.shape == (2, 5, 8)


def test_sinkhorn_knopp_stays_finite_where_exp_would_underflow():
    logits = torch.randn(64, 8) * 0.3
    logits[:, 3] -= 3.0  # at 0.04 every sample's exp for this prototype is ~1e-33 of the others'
    p = SinkhornKnopp().probs(logits, 0.04)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(64))


def _sinkhorn_rank(rank: int, port: int, logits: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(SinkhornKnopp().probs(logits.chunk(2)[rank], 0.1), f"{out}/p{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_knopp_on_two_processes_balances_their_joint_batch(tmp_path):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)) * 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sinkhorn_rank, args=(port, logits, str(tmp_path)), nprocs=2, join=True)
    joint = torch.cat([torch.load(tmp_path / f"p{r}.pt") for r in range(2)])
    torch.testing.assert_close(joint, SinkhornKnopp().probs(logits, 0.1), rtol=1e-5, atol=1e-6)


def test_a_typed_config_knows_its_method():
    from mimkit.methods import DINO, IBOT

    assert check_method_cfg(DINO.Config(out_dim=64)).name == "dino"
    assert check_method_cfg(IBOT.Config()).name == "ibot"
    with pytest.raises(ConfigError, match=r"method\.name 'mae' does not match.*DINO\.Config"):
        check_method_cfg(DINO.Config(name="mae"))


def test_unknown_centering_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="center, sinkhorn_knopp"):
        make_centering("median", 4, 0.9)
    with pytest.raises(ConfigError, match=r"method\.centering.*center, sinkhorn_knopp"):
        check_method_cfg({"name": "dino", "centering": "median"})


@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_sinkhorn_knopp_trains_in_place_of_the_centre(name):
    method = tiny_teacher_student(name, centering="sinkhorn_knopp").train()
    out = method(four_views())
    assert torch.isfinite(out.loss) and "center_norm" not in out.logs
    out.loss.backward()
    method.after_step(0, 10)
    assert not any(k.startswith("center") for k in method.state_dict())


@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_a_checkpoint_from_before_the_centre_module_still_loads(tmp_path, name):
    method = tiny_teacher_student(name).train()
    method(four_views()).loss.backward()
    method.after_step(0, 10)
    old = {k.replace("center.value", "center").replace("center2.value", "center2"): v.contiguous()
           for k, v in method.state_dict().items()}
    assert "center" in old and "center.value" not in old
    save_file(old, str(tmp_path / MODEL_FILE))
    # export and visualize check the file on the meta device first, then load it
    fresh = build_for_weights(lambda: tiny_teacher_student(name), tmp_path / MODEL_FILE)
    fresh.load_state_dict(read_weights(fresh, tmp_path))
    assert torch.equal(fresh.center.value, method.center.value) and fresh.center.value.abs().sum() > 0
    fresh.load_state_dict(old)  # loading the old keys directly renames them too
    assert torch.equal(fresh.center.value, method.center.value)
