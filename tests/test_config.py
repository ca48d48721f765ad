from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import fake_run, method_batch

import mimkit
from mimkit.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    load_yaml,
    parse_overrides,
    to_yaml,
)
from mimkit.methods import MAE, METHODS, check_method_cfg
from mimkit.methods.helpers import fill_helper_settings
from mimkit.models import load_config, method_from_config

PACKAGED = Path(mimkit.__file__).parent / "configs" / "pretrain" / "mae_fmnist.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, PretrainConfig)
    assert cfg.data == DataConfig()
    assert cfg.optim == OptimConfig()
    assert cfg.train == TrainConfig()
    assert cfg.backbone == {"name": "vit_tiny_p4"}
    assert cfg.method == MAE.Config(name="mae")


def test_parse_overrides_types():
    tree = parse_overrides([
        "optim.base_lr=1e-3", "data.hflip=true", "data.crop_scale=[0.5, 1]", "seed=3",
        "run_dir=runs/a.b", "method.mask_ratio=0.6", "data.root=",
    ])
    assert tree["optim"]["base_lr"] == pytest.approx(1e-3) and isinstance(tree["optim"]["base_lr"], float)
    assert tree["data"]["hflip"] is True
    assert tree["data"]["crop_scale"] == [0.5, 1]
    assert tree["seed"] == 3 and isinstance(tree["seed"], int)
    assert tree["run_dir"] == "runs/a.b"
    assert tree["method"]["mask_ratio"] == 0.6
    assert tree["data"]["root"] == ""


def test_override_without_equals_refused():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.base_lr"])


def test_yaml_then_overrides_layer(tmp_path):
    path = _write(tmp_path / "c.yaml", """
seed: 5
data:
  img_size: 32
  hflip: false
optim:
  base_lr: 2.0e-4
  batch_size: 64
method:
  name: mae
  mask_ratio: 0.6
""")
    cfg = load_config(path, ["optim.base_lr=1e-3", "data.crop_scale=[0.5, 1]", "train.compile=true",
                             "method.decoder_dim=64"])
    # YAML over defaults
    assert cfg.seed == 5 and cfg.data.img_size == 32
    assert cfg.optim.batch_size == 64
    assert cfg.method.mask_ratio == 0.6
    # overrides over YAML, with YAML scalar typing
    assert cfg.optim.base_lr == pytest.approx(1e-3) and isinstance(cfg.optim.base_lr, float)
    # data.hflip (YAML) and data.crop_scale (override) are read as the method's single view
    assert cfg.method.views == [{"hflip": 0.0, "scale": [0.5, 1]}]
    assert cfg.train.compile is True
    assert cfg.method.decoder_dim == 64
    # untouched defaults survive the merge
    assert cfg.data.name == "fashion_mnist" and cfg.optim.weight_decay == 0.05
    assert cfg.backbone == {"name": "vit_tiny_p4"}


def test_int_written_for_float_field_is_coerced():
    cfg = load_config(None, ["train.epochs=3", "optim.base_lr=1"])
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 3.0
    assert isinstance(cfg.optim.base_lr, float)


@pytest.mark.parametrize("override, message", [
    ("data.img_size=abc", "data.img_size"),
    ("train.compile=3", "train.compile"),
    ("optim.batch_size=true", "optim.batch_size"),
    ("optim.betas=0.9", "optim.betas"),
])
def test_wrong_type_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, bad, some_valid", [
    ("bogus=1", "bogus", ["run_dir", "seed", "data", "optim", "train"]),
    ("data.bogus=1", "data.bogus", ["img_size", "subset_fraction", "randaugment_ops"]),
    ("optim.bogus=1", "optim.bogus", ["base_lr", "batch_size", "warmup_epochs"]),
    ("train.bogus=1", "train.bogus", ["epochs", "precision", "max_bad_steps"]),
    ("method.bogus=1", "method.bogus", ["name", "mask_ratio", "decoder_dim", "norm_pix_loss"]),
    ("backbone.bogus=1", "backbone.bogus", ["name", "embed_dim", "depth", "patch_size"]),
])
def test_unknown_keys_refused_with_valid_list(override, bad, some_valid):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert bad in msg
    assert "valid keys" in msg
    listed = msg.split("valid keys:")[1]
    for key in some_valid:
        assert key in listed, f"{key} not listed in {msg!r}"


def test_unknown_key_in_yaml_refused(tmp_path):
    path = _write(tmp_path / "c.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*valid keys:.*base_lr"):
        load_config(path)


def test_unknown_backbone_and_method_names_refused():
    with pytest.raises(ConfigError, match="vit_nonexistent.*valid:.*vit_tiny_p4"):
        load_config(None, ["backbone.name=vit_nonexistent"])
    with pytest.raises(ConfigError, match="nomethod.*valid:.*mae"):
        load_config(None, ["method.name=nomethod"])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_refused(ratio):
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(None, [f"method.mask_ratio={ratio}"])


@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.95])
def test_mask_ratio_inside_interval_accepted(ratio):
    assert load_config(None, [f"method.mask_ratio={ratio}"]).method.mask_ratio == ratio


def test_bad_precision_refused():
    with pytest.raises(ConfigError, match="precision.*fp8"):
        load_config(None, ["train.precision=fp8"])
    for ok in ("auto", "fp32", "bf16", "fp16"):
        assert load_config(None, [f"train.precision={ok}"]).train.precision == ok


@pytest.mark.parametrize("override, message", [
    ("data.channels=2", "data.channels"),
    ("data.subset_fraction=0", "data.subset_fraction"),
    ("data.subset_fraction=1.5", "data.subset_fraction"),
    ("data.crop_scale=[0.9, 0.5]", r"method.views\[0\].scale"),
    ("method.views=[{scale: [0.9, 0.5]}]", r"method.views\[0\].scale"),
    ("method.views=[{count: 2}]", "trains on 1 view"),
    ("data.cache=maybe", "data.cache"),
    ("data.img_size=0", "data.img_size"),
    ("optim.batch_size=0", "batch_size"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.epochs=0", "train.epochs"),
    ("data.mean=[0.5]", r"data.mean / data.std must be both empty.*\[0.5\] / \[\]"),
    ("data.mean=[0.5, 0.5, 0.5]", "one per channel"),
    ("data.mean=[128]", r"data.mean must be values in \[0, 1\]"),
])
def test_out_of_range_values_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _stand_in_helpers(method: dict, root: Path) -> None:
    """Fresh-weight runs under ``root`` for the helper runs a packaged config names (BEiT's tokenizer,
    VQ-KD's teacher), each built from the packaged config that trains it (the one with that run_dir)."""
    for run_key in getattr(METHODS[method["name"]].Config, "helpers", {}):
        run = method.get(run_key)
        if run and not (root / run).is_dir():
            source = next(p for p in PACKAGED.parent.glob("*.yaml") if load_yaml(p)["run_dir"] == run)
            _stand_in_helpers(load_yaml(source)["method"], root)
            fake_run(root / run, load_config(source))


@pytest.mark.parametrize("path", sorted((PACKAGED.parent).glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_config_loads_and_builds(path, tmp_path, monkeypatch):
    assert PACKAGED.is_file()
    raw = load_yaml(path)  # with any base config merged underneath
    monkeypatch.chdir(tmp_path)  # helper runs are named relative to where a command runs
    _stand_in_helpers(raw["method"], tmp_path)
    cfg = load_config(path)
    assert "base" not in raw
    assert cfg.run_dir == raw["run_dir"]
    assert cfg.method == fill_helper_settings(check_method_cfg(raw["method"]))
    assert {k: v for k, v in dataclasses.asdict(cfg.method).items() if k in raw["method"]} == raw["method"]
    assert cfg.backbone == raw["backbone"]
    assert cfg.optim.base_lr == pytest.approx(raw["optim"]["base_lr"])
    assert cfg.train.epochs == float(raw["train"]["epochs"])
    method = method_from_config(cfg)
    n = max(2, method.batch_multiple)  # a method that mixes images in sets gets one whole set
    out = method(method_batch(method, torch.randn(n, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)))
    assert torch.isfinite(out.loss)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_base_config_is_merged_underneath(tmp_path):
    base = _write(tmp_path / "parent.yaml", "run_dir: runs/parent\nmethod:\n  name: mae\n  mask_ratio: 0.6\n"
                                             "optim:\n  base_lr: 0.002\n")
    _write(tmp_path / "child.yaml", f"base: {base.name}\nrun_dir: runs/child\nmethod:\n  mask_ratio: 0.5\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.batch_size=8"])
    assert cfg.run_dir == "runs/child"
    assert cfg.method == MAE.Config(name="mae", mask_ratio=0.5)  # nested keys merge, the child's win
    assert cfg.optim.base_lr == pytest.approx(0.002) and cfg.optim.batch_size == 8


def test_base_path_is_relative_to_the_file_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    _write(tmp_path / "cfg" / "parent.yaml", "run_dir: runs/right\n")
    _write(tmp_path / "parent.yaml", "run_dir: runs/wrong\n")
    _write(tmp_path / "cfg" / "child.yaml", "base: parent.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("cfg/child.yaml").run_dir == "runs/right"


def test_base_config_by_packaged_name(tmp_path):
    child = _write(tmp_path / "c.yaml", "base: cvt_mae_fmnist\nmethod:\n  skip: false\n")
    cfg = load_config(child)
    assert cfg.method.skip is False and cfg.method.name == "cvt_mae"
    assert cfg.backbone == load_config(PACKAGED.parent / "cvt_mae_fmnist.yaml").backbone


def test_ablation_configs_differ_from_the_full_method_only_in_their_switches():
    full = load_config(PACKAGED.parent / "cvt_mae_fmnist.yaml")
    for name, changed in [("no_skip", {"skip": False}), ("no_update_mask", {"update_mask": "mask_only"}),
                          ("no_skip_no_update_mask", {"skip": False, "update_mask": "mask_only"})]:
        cell = load_config(PACKAGED.parent / f"cvt_mae_fmnist_{name}.yaml")
        assert cell.method == dataclasses.replace(full.method, **changed)
        assert (cell.data, cell.optim, cell.train, cell.backbone) == (full.data, full.optim, full.train, full.backbone)


def test_bad_base_configs_are_named(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"orphan.yaml: base: config 'no_such' not found.*mae_fmnist"):
        load_config(_write(tmp_path / "orphan.yaml", "base: no_such\n"))
    with pytest.raises(ConfigError, match="base must be a config name"):
        load_config(_write(tmp_path / "num.yaml", "base: 3\n"))


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(PACKAGED, ["optim.min_lr=1e-6", "data.crop_scale=[0.2, 0.9]", "method.mask_ratio=0.6",
                                 "backbone.embed_dim=64", "train.max_minutes=1.5", "run_dir=" + str(tmp_path)])
    path = _write(tmp_path / "round.yaml", to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_yaml_file_exponent_without_dot_is_float(tmp_path):
    path = _write(tmp_path / "c.yaml", "optim:\n  base_lr: 1e-3\n")
    assert load_config(path).optim.base_lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override", ["train.log_every=0", "train.device=gpu"])
def test_engine_settings_validated_up_front(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_yaml_words_stay_words_and_booleans_need_true_or_false(tmp_path):
    """YAML 1.1 read ``no`` as False, so the documented data.cache=no was refused."""
    assert load_config(None, ["data.cache=no"]).data.cache == "no"
    assert load_config(None, ["data.cache=yes"]).data.cache == "yes"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  cache: no\n  hflip: off\noptim:\n  base_lr: 1e-3\n")
    cfg = load_config(path)
    assert (cfg.data.cache, cfg.method.views, cfg.optim.base_lr) == ("no", [{"hflip": 0.0}], 1e-3)
    assert load_config(None, ["data.hflip=yes"]).method.views == [{"hflip": 0.5}]
    with pytest.raises(ConfigError, match="data.hflip: expected bool, got 'maybe'"):
        load_config(None, ["data.hflip=maybe"])


@pytest.mark.parametrize("override", ["train.budget_minutes=nan", "optim.base_lr=.inf", "optim.clip_grad=-.inf"])
def test_non_finite_numbers_refused(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: expected a finite number"):
        load_config(None, [override])


def test_the_packaged_eval_config_is_the_protocol_results_are_named_against():
    """A result is named by its settings that differ from runner.PROTOCOL; the packaged config must be it."""
    from mimkit.config import load_eval_config
    from mimkit.evaluation.runner import PROTOCOL

    cfg = load_eval_config()
    assert tuple(cfg.knn.k) == PROTOCOL["k"][0] and cfg.knn.temperature == PROTOCOL["temperature"][0]
    assert (cfg.linprobe.epochs, cfg.linprobe.lr, cfg.linprobe.batch_size) == tuple(
        PROTOCOL[k][0] for k in ("epochs", "lr", "probe_batch_size"))
    assert (cfg.features.train_fraction, cfg.features.blocks) == (PROTOCOL["train_fraction"][0],
                                                                  PROTOCOL["blocks"][0])


def test_eval_config_refuses_unknown_keys_and_ranges(tmp_path):
    from mimkit.config import load_eval_config

    (tmp_path / "bad.yaml").write_text("knn:\n  neighbours: 5\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) knn.neighbours in knn; valid keys: k, temperature"):
        load_eval_config(tmp_path / "bad.yaml")
    (tmp_path / "zero.yaml").write_text("knn:\n  temperature: 0\n")
    with pytest.raises(ConfigError, match="knn.temperature"):
        load_eval_config(tmp_path / "zero.yaml")
    with pytest.raises(ConfigError, match="evaluation config 'nope' not found.*default"):
        load_eval_config("nope")


def test_data_crop_and_flip_are_read_as_the_single_view(tmp_path):
    """Run folders from before views hold data.crop_scale / data.hflip: they still load, as views."""
    path = _write(tmp_path / "old.yaml", """
data:
  crop_scale: [0.2, 1.0]
  hflip: true
method:
  name: mae
""")
    assert load_config(path).method.views == [{"scale": [0.2, 1.0], "hflip": 0.5}]
    # merged into views the method already declares, key by key
    cfg = load_config(PACKAGED, ["data.hflip=false"])
    assert cfg.method.views == [{"scale": [0.35, 1.0], "hflip": 0.0}]
    # a method with several kinds of view has no single crop for them to mean, also by default
    with pytest.raises(ConfigError, match=r"data.crop_scale: the crop and flip .* are set per view in method.views"):
        load_config(PACKAGED, ["method.views=[{}, {size: 8}]", "data.crop_scale=[0.5, 1]"])
    with pytest.raises(ConfigError, match=r"data.hflip: the crop and flip .* are set per view in method.views"):
        load_config(None, ["method.name=dino", "data.hflip=false"])


def test_validation_reads_no_environment(monkeypatch, tiny_run_config):
    """The peak lr depends on the number of processes: the trainer, which knows it, checks min_lr."""
    from mimkit.engine.distributed import DistInfo
    from mimkit.engine.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "64")
    assert load_config(None, ["optim.min_lr=0.01"]).optim.min_lr == 0.01  # above one process's peak lr
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert load_config(None, ["optim.min_lr=0.01"]).optim.min_lr == 0.01
    with pytest.raises(ConfigError, match=r"optim\.min_lr must be at most the peak lr 0\.001 .*1 process"):
        Trainer(tiny_run_config("optim.min_lr=0.5"), DistInfo())


def test_run_folder_named_after_config_and_data(tmp_path):
    """The same config on other data runs elsewhere; on its own data, or with run_dir given, where it says."""
    assert load_config("mae_fmnist").run_dir == "runs/mae_fmnist"
    pets = tmp_path / "my pets"
    assert load_config("mae_fmnist", [f"data.root={pets}"]).run_dir == "runs/mae_fmnist-my_pets"
    assert load_config("mae_fmnist", ["data.name=cifar10"]).run_dir == "runs/mae_fmnist-cifar10"
    assert load_config("mae_fmnist", [f"data.root={pets}", "run_dir=runs/x"]).run_dir == "runs/x"
    assert load_config("mae_vits_rgb64", [f"data.root={pets}/"]).run_dir == "runs/mae_vits_rgb64-my_pets"
    assert load_config("mae_fmnist", ["data.img_size=32"]).run_dir == "runs/mae_fmnist"


def test_other_data_is_normalised_with_its_own_statistics():
    from mimkit.config import on_other_data

    run = DataConfig(name="imagefolder", root="/data/pets", channels=3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    assert on_other_data(run, "imagefolder", "/data/pets", []) == run
    other = dataclasses.replace(run, root="/data/birds")
    assert on_other_data(other, "imagefolder", "/data/pets", []).mean == []
    assert on_other_data(other, "imagefolder", "/data/pets", ["data.mean=[0.5,0.4,0.3]"]) == other
