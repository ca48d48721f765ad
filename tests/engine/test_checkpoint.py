from __future__ import annotations

import errno
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mimkit.backbones import create_backbone
from mimkit.engine.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step: int) -> dict:
    return {"step": step, "epoch": 1, "batch_in_epoch": 3, "lr": 0.5, "tensor": torch.arange(4),
            "nested": {"a": [1, 2.5, "x"]}, "rng": [rng_state()]}


def test_save_and_load_round_trip(tmp_path, tiny_mae):
    opt = torch.optim.AdamW(tiny_mae.parameters(), lr=0.1)
    tiny_mae(torch.randn(2, 1, 28, 28)).loss.backward()
    opt.step()
    state = _state(7) | {"optimizer": opt.state_dict()}
    ckpt = save_checkpoint(tmp_path / "checkpoints", 7, tiny_mae, state)
    assert ckpt.name == "step_00000007"
    assert (ckpt / MODEL_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    # weights are plain safetensors
    weights = load_file(str(ckpt / MODEL_FILE))
    assert set(weights) == set(tiny_mae.state_dict())
    # state loads with weights_only=True
    raw = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert raw["step"] == 7 and raw["nested"] == {"a": [1, 2.5, "x"]}
    loaded = load_state(ckpt)
    assert torch.equal(loaded["tensor"], torch.arange(4))
    fresh_opt = torch.optim.AdamW(tiny_mae.parameters(), lr=0.1)
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()

    torch.manual_seed(1)
    from mimkit.methods import create_method

    other = create_method({"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
                          create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    assert not torch.equal(other.encoder.cls_token, tiny_mae.encoder.cls_token)
    load_weights(other, ckpt)
    for (k, a), (_, b) in zip(other.state_dict().items(), tiny_mae.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_load_encoder_with_prefix(tmp_path, tiny_mae):
    ckpt = save_checkpoint(tmp_path, 1, tiny_mae, {"step": 1})
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    load_weights(enc, ckpt, prefix="encoder.")
    assert torch.equal(enc.patch_embed.proj.weight, tiny_mae.encoder.patch_embed.proj.weight)


def test_load_into_other_architecture_names_mismatches(tmp_path, tiny_mae):
    ckpt = save_checkpoint(tmp_path, 1, tiny_mae, {"step": 1})
    wider = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match=r"shape mismatches \[blocks\.0\.attn\.proj\.bias: checkpoint "
                                              r"\(32,\) vs model \(64,\).*\(\+\d+ more\)"):
        load_weights(wider, ckpt, prefix="encoder.")
    deeper = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\."):
        load_weights(deeper, ckpt, prefix="encoder.")
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[decoder\."):
        load_weights(enc, ckpt)  # no prefix: the whole method's keys
    assert "model.safetensors" in str(pytest.raises(CheckpointError, load_weights, deeper, ckpt).value)


def test_damaged_files_raise_checkpoint_error(tmp_path, tiny_mae):
    ckpt = save_checkpoint(tmp_path, 1, tiny_mae, {"step": 1})
    (ckpt / MODEL_FILE).write_bytes(b"garbage")
    (ckpt / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(tiny_mae, ckpt)
    with pytest.raises(CheckpointError, match="cannot read training state"):
        load_state(ckpt)


class _Custom:
    """Not in torch.load's weights_only allow-list."""


def test_state_with_arbitrary_objects_refused_by_weights_only(tmp_path, tiny_mae):
    ckpt = save_checkpoint(tmp_path, 1, tiny_mae, {"obj": _Custom()})
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(ckpt)


def test_incomplete_checkpoints_never_latest(tmp_path, tiny_mae):
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir, 5, tiny_mae, {"step": 5}, keep_last=0)
    # a write killed before the rename: a temporary folder with a higher step
    tmp = ckpt_dir / ".tmp-step_00000009-12345"
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes((ckpt_dir / "step_00000005" / MODEL_FILE).read_bytes())
    (tmp / STATE_FILE).write_bytes((ckpt_dir / "step_00000005" / STATE_FILE).read_bytes())
    # a step folder without state.pt, and one without weights
    (ckpt_dir / "step_00000008").mkdir()
    (ckpt_dir / "step_00000008" / MODEL_FILE).write_bytes(b"x")
    (ckpt_dir / "step_00000007").mkdir()
    (ckpt_dir / "step_00000007" / STATE_FILE).write_bytes(b"x")
    # a badly named folder
    (ckpt_dir / "step_9").mkdir()
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step_00000005"
    assert list_checkpoints(ckpt_dir) == [ckpt_dir / "step_00000005"]
    assert resolve_checkpoint(tmp_path) == ckpt_dir / "step_00000005"


def test_failed_write_leaves_no_folder(tmp_path, tiny_mae, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir, 1, tiny_mae, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match="the disk is full.*step_00000001 is intact"):
        save_checkpoint(ckpt_dir, 2, tiny_mae, {"step": 2})
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000001"]
    assert latest_checkpoint(ckpt_dir).name == "step_00000001"


def test_keep_last_pruning(tmp_path, tiny_mae):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(ckpt_dir, step, tiny_mae, {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_00000010", "step_00000011"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000010", "step_00000011"]
    keep_all = tmp_path / "all"
    for step in (1, 2, 3):
        save_checkpoint(keep_all, step, tiny_mae, {"step": step}, keep_last=0)
    assert len(list_checkpoints(keep_all)) == 3


def test_rotation_keeps_a_checkpoint_that_holds_results(tmp_path, tiny_mae):
    """Evaluating an intermediate checkpoint writes its results beside it: rotation must not delete them."""
    ckpt_dir = tmp_path / "checkpoints"
    first = save_checkpoint(ckpt_dir, 1, tiny_mae, {"step": 1}, keep_last=2)
    (first / "knn-k3.json").write_text("{}")
    for step in (2, 3, 4):
        save_checkpoint(ckpt_dir, step, tiny_mae, {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_00000001", "step_00000003", "step_00000004"]
    assert (first / "knn-k3.json").is_file()


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path, tiny_mae):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 11):
        save_checkpoint(ckpt_dir, step, tiny_mae, {"step": step}, keep_last=2)
    written = save_checkpoint(ckpt_dir, 3, tiny_mae, {"step": 3}, keep_last=2)
    assert written.is_dir() and (written / MODEL_FILE).is_file()


def test_overwrite_same_step(tmp_path, tiny_mae):
    save_checkpoint(tmp_path, 4, tiny_mae, {"step": 4, "v": 1})
    save_checkpoint(tmp_path, 4, tiny_mae, {"step": 4, "v": 2})
    assert load_state(tmp_path / "step_00000004")["v"] == 2


def test_resolve_checkpoint(tmp_path, tiny_mae):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    save_checkpoint(ckpt_dir, 3, tiny_mae, {}, keep_last=0)
    last = save_checkpoint(ckpt_dir, 6, tiny_mae, {}, keep_last=0)
    assert resolve_checkpoint(tmp_path / "run") == last
    assert resolve_checkpoint(ckpt_dir) == last
    assert resolve_checkpoint(ckpt_dir / "step_00000003") == ckpt_dir / "step_00000003"
    assert resolve_checkpoint(ckpt_dir / "step_00000003" / MODEL_FILE) == ckpt_dir / "step_00000003"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn()


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
