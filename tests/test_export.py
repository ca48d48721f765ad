"""``mimkit export`` and ``mimkit.load_encoder``: every method and backbone, timm's ViT, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import METHOD_BACKBONE_PAIRS, tiny_backbone_kwargs, tiny_method_cfg
from safetensors.torch import save_file

import mimkit
from mimkit.backbones.vit import VisionTransformer
from mimkit.cli import main
from mimkit.config import to_yaml
from mimkit.errors import CheckpointError, CheckpointMismatchError, ConfigError
from mimkit.export import ENCODER_WEIGHTS, export_checkpoint
from mimkit.models import compose_config, method_from_config

pytestmark = pytest.mark.fmnist  # the export records the training set's normalisation


def _checkpoint(folder, method_name, backbone):
    """A checkpoint folder (weights and config) of a randomly initialised method, as a run leaves one."""
    kwargs, img = tiny_backbone_kwargs(backbone, in_chans=1)
    kwargs.pop("img_size"), kwargs.pop("in_chans")
    cfg = compose_config([{
        "run_dir": str(folder), "backbone": {"name": backbone, **kwargs},
        "method": tiny_method_cfg(method_name, img, backbone),
        "data": {"img_size": img, "channels": 1, "subset_fraction": 0.01},
    }], [])
    torch.manual_seed(0)
    method = method_from_config(cfg)
    for p in method.parameters():  # away from the initialisation, so a load that does nothing shows
        p.data.add_(0.01 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return method.eval(), img


@pytest.mark.parametrize("method_name, backbone", METHOD_BACKBONE_PAIRS)
def test_exported_encoder_gives_the_same_features(tmp_path, method_name, backbone):
    method, img = _checkpoint(tmp_path / "ckpt", method_name, backbone)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["backbone"]["name"] == backbone and meta["input"]["channels"] == 1
    assert len(meta["input"]["mean"]) == 1 and 0 < meta["input"]["std"][0] < 1
    encoder = mimkit.load_encoder(out)
    assert not encoder.training and encoder.input_stats["img_size"] == img
    x = torch.randn(3, 1, img, img)
    with torch.no_grad():
        ours = method.eval_module.forward_head(method.eval_module.forward_features(x), pre_logits=True)
        theirs = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    assert torch.equal(ours, theirs)
    if isinstance(method.eval_module, VisionTransformer):
        _check_timm(out, x, ours)
    else:
        assert not (out / "timm").exists()


def _check_timm(out, x, expected):
    """timm's own loader reads the export's ``timm/`` folder: the same features, and its input pipeline."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    assert type(model).__module__.startswith("timm.")
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    meta = json.loads((out / "encoder.json").read_text())["input"]
    data = resolve_model_data_config(model)
    assert data["input_size"] == (1, meta["img_size"], meta["img_size"])
    assert list(data["mean"]) == meta["mean"] and list(data["std"]) == meta["std"]


def test_the_export_is_a_checkpoint_every_command_reads(tmp_path):
    """The whole model travels with the encoder: reconstructions from a released model."""
    _checkpoint(tmp_path / "ckpt", "cvt_mae", "cvt_tiny_s4")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    png = tmp_path / "recon.png"
    assert main(["visualize", str(out), "--num", "2", "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_export_refuses_to_overwrite_and_load_refuses_what_is_not_an_export(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt", "mae", "vit_tiny_p4")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    before = (out / ENCODER_WEIGHTS).read_bytes()
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert (out / ENCODER_WEIGHTS).read_bytes() == before, "a refused export leaves the old one"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(ConfigError):
        export_checkpoint(tmp_path / "ckpt", out)
    with pytest.raises(ConfigError, match="holds the checkpoint being exported"):
        export_checkpoint(tmp_path / "ckpt", tmp_path, overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file(), "the source survives"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "file", overwrite=True)
    with pytest.raises(CheckpointError, match="not a mimkit export"):
        mimkit.load_encoder(tmp_path / "ckpt")
    (out / ENCODER_WEIGHTS).write_bytes(before[:100])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        mimkit.load_encoder(out)
    meta = json.loads((out / "encoder.json").read_text())
    (out / "encoder.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "input"}))
    with pytest.raises(CheckpointError, match="no input entry"):
        mimkit.load_encoder(out)
    meta["backbone"]["embed_dim"] = 64
    (out / "encoder.json").write_text(json.dumps(meta))
    (out / ENCODER_WEIGHTS).write_bytes(before)
    with pytest.raises(CheckpointMismatchError, match="does not fit this architecture"):
        mimkit.load_encoder(out)


def test_encoder_json_values_are_checked_like_typed_ones(tmp_path, monkeypatch):
    """A non-numeric or oversized setting in encoder.json is refused, and no real model is built for it."""
    from mimkit import export

    _checkpoint(tmp_path / "ckpt", "mae", "vit_tiny_p4")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    meta = json.loads((out / "encoder.json").read_text())
    (out / "encoder.json").write_text(json.dumps({**meta, "backbone": {**meta["backbone"], "depth": "two"}}))
    with pytest.raises(CheckpointError, match=r"encoder\.json: backbone\.depth: expected int, got 'two'"):
        mimkit.load_encoder(out)
    built_on = []
    real = export.create_backbone

    def spy(name, **kwargs):
        built_on.append(torch.empty(0).device.type)  # the default device the module is built on
        return real(name, **kwargs)

    monkeypatch.setattr(export, "create_backbone", spy)
    huge = {**meta["backbone"], "depth": 48, "embed_dim": 65536, "num_heads": 16}
    (out / "encoder.json").write_text(json.dumps({**meta, "backbone": huge}))
    with pytest.raises(CheckpointMismatchError, match="does not fit this architecture"):
        mimkit.load_encoder(out)
    assert built_on == ["meta"], "the oversized model must only be built on the meta device"
