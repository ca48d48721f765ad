"""``mimkit resources``: every method and backbone measured, FLOPs against a hand count, refusals."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import METHOD_BACKBONE_PAIRS, tiny_backbone_kwargs, tiny_method_cfg

from mimkit.cli import main
from mimkit.errors import ConfigError
from mimkit.evaluation.resources import COLUMNS, config_spec, measure, measure_configs


def _tiny_config(folder, method_name, backbone):
    kwargs, img = tiny_backbone_kwargs(backbone, in_chans=1)
    kwargs.pop("img_size"), kwargs.pop("in_chans")
    path = folder / f"{method_name}-{backbone}.yaml"
    method = tiny_method_cfg(method_name, img, backbone)
    path.write_text(yaml.safe_dump({"backbone": {"name": backbone, **kwargs}, "method": method,
                                    "data": {"img_size": img, "channels": 1}, "train": {"device": "cpu"}}))
    return str(path)


@pytest.mark.parametrize("method_name, backbone", METHOD_BACKBONE_PAIRS)
def test_every_method_and_backbone_can_be_measured(tmp_path, method_name, backbone):
    row = measure(_tiny_config(tmp_path, method_name, backbone), batch=2, steps=1, precision="fp32")
    assert {k for k, _ in COLUMNS} <= set(row)
    assert 0 < row["encoder_params"] <= row["total_params"]
    assert row["train_gflop_per_img"] > 0 and row["infer_gflop_per_img"] > 0
    assert row["train_img_per_s"] > 0 and row["infer_img_per_s"] > 0 and row["peak_mib"] > 0


def test_vit_flops_match_a_count_by_hand(tmp_path):
    """Encoder FLOPs of a ViT: patch projection, q/k/v, attention, projection and MLP, 2 per multiply-add."""
    spec = _tiny_config(tmp_path, "mae", "vit_tiny_p4")
    cfg = config_spec(spec, 0, [])
    d, depth, p, img = cfg.backbone["embed_dim"], cfg.backbone["depth"], 4, cfg.data.img_size
    n = (img // p) ** 2 + 1  # patches and the class token
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    expected = 2 * (n - 1) * d * p * p * 1 + depth * per_block
    row = measure(spec, batch=2, steps=1, precision="fp32")
    assert row["infer_gflop_per_img"] * 1e9 == pytest.approx(expected, rel=1e-6)


def test_configs_are_measured_in_their_own_processes_and_refused_up_front(tmp_path, capsys):
    spec = _tiny_config(tmp_path, "mae", "vit_tiny_p4")
    out = tmp_path / "rows.json"
    assert main(["resources", spec, "--batch-size", "2", "--steps", "1", "--threads", "1", "--precision", "fp32",
                 "--out", str(out), "optim.weight_decay=0.0"]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["threads"] == 1 and rows[0]["batch"] == 2
    assert f"| {spec} | {rows[0]['img_size']} | {rows[0]['encoder_params']:,} |" in table
    assert "process peak RSS" in table
    with pytest.raises(ConfigError, match="not found"):
        measure_configs([spec, "no_such_config"], batch=2, steps=1)
    with pytest.raises(ConfigError, match="backbone.name 'no_such_backbone' is unknown"):
        measure_configs([f"{spec}@no_such_backbone"], batch=2, steps=1)


def test_a_backbone_can_be_swapped_in_with_its_preset():
    cfg = config_spec("cvt_mae_fmnist_s4@cvt_13", 64, ["data.channels=3"])
    assert cfg.backbone == {"name": "cvt_13"} and cfg.data.img_size == 64 and cfg.data.channels == 3


def test_the_breakdown_by_module_adds_up_to_the_forward(tmp_path, capsys):
    """Every forward FLOP of a CvT-MAE falls in one of its encoder's stages or its decoder, and the
    decoder's stages and head make up the decoder; deeper names are left out."""
    spec = _tiny_config(tmp_path, "cvt_mae", "cvt_tiny_s2")
    row = measure(spec, batch=2, steps=1, precision="fp32", breakdown=3)
    parts = row["forward_gflop_by_module"]
    stages = [g for name, g in parts.items() if name.startswith("encoder.stages.")]
    decoder = [g for name, g in parts.items() if name.startswith("decoder.ups.") and name.count(".") == 2
               or name == "decoder.head"]
    assert len(stages) == 3 and all(g > 0 for g in stages)
    assert sum(stages) + parts["decoder"] == pytest.approx(row["forward_gflop_per_img"], rel=1e-9)
    assert sum(decoder) == pytest.approx(parts["decoder"], rel=1e-9)
    assert all(name.count(".") <= 2 for name in parts)
    assert 0 < row["forward_gflop_per_img"] < row["train_gflop_per_img"]
    assert main(["resources", spec, "--batch-size", "2", "--steps", "1", "--precision", "fp32",
                 "--breakdown", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Forward FLOPs of {spec}" in out and "| decoder |" in out and "stages" not in out
