from __future__ import annotations

import dataclasses
import json
import re
import runpy
import sys

import pytest
import yaml

from mimkit.cli import build_parser, main, resolve_config_path
from mimkit.config import ConfigError
from mimkit.methods import MAE


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


# Read from the parser, so a new subcommand is covered by the --help tests automatically.
SUBCOMMANDS = _subcommands()
CORE = {"pretrain", "config", "knn", "linprobe", "visualize"}


def _exit_code(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_help(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd, capsys):
    assert _exit_code([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mimkit {cmd}")


def test_parser_has_core_subcommands():
    assert CORE <= set(SUBCOMMANDS)


def test_missing_command_and_bad_option(capsys):
    assert _exit_code([]) == 2
    assert _exit_code(["knn", "--precision", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "optim.base_lr=1e-3", "method.mask_ratio=0.6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["base_lr"] == pytest.approx(1e-3)
    assert printed["method"] == dataclasses.asdict(MAE.Config(name="mae", mask_ratio=0.6))  # every setting, resolved
    assert printed["data"]["name"] == "fashion_mnist"


def test_config_with_packaged_name(capsys):
    assert main(["config", "--config", "mae_fmnist", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == "runs/mae_fmnist" and printed["train"]["epochs"] == 3.0
    assert printed["method"]["decoder_dim"] == 128


def test_config_unknown_key(capsys):
    assert main(["config", "foo=1"]) == 2
    captured = capsys.readouterr()
    assert "foo" in captured.err and "valid keys" in captured.err
    assert captured.err.startswith("mimkit config: error:")
    assert captured.out == ""


def test_config_bad_file(capsys, tmp_path):
    assert main(["config", "--config", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "mae_fmnist" in err  # lists the packaged configs
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    assert main(["config", "--config", str(path)]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_resolve_config_path(tmp_path):
    assert resolve_config_path(None) is None
    assert resolve_config_path("mae_fmnist").name == "mae_fmnist.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("seed: 1\n")
    assert resolve_config_path(str(own)) == own
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("nope")


def test_pretrain_bad_override_exits_2(capsys, tmp_path):
    assert main(["pretrain", f"run_dir={tmp_path}", "optim.lr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "mae_fmnist", "data.img_size=30"], "data.img_size 30 is not divisible by backbone.patch_size 4"),
    (["--config", "mae_fmnist", "method.mask_ratio=1.2"], "method.mask_ratio must be in (0, 1), got 1.2"),
    (["--config", "cvt_mae_fmnist", "method.mask_size=8"], "method.mask_size 8 does not tile 28x28"),
    (["--config", "cvt_mae_fmnist", "method.mask_ratio=0"], "method.mask_ratio must be in (0, 1)"),
    # a 7x7/4 first embedding covers 12 of 14 pixels: the decoder could not predict the last two
    (["--config", "cvt_mae_fmnist_s4", "data.img_size=14", "method.mask_size=2"],
     "14x14 training images (data.img_size, or a view's size) leave pixels outside every first-stage window"),
    (["data.name=imagefolder", "data.root=/nonexistent/x"], "data.root: folder not found: /nonexistent/x"),
    (["backbone.name=cvt_tiny_s2"], "Valid backbones"),
])
def test_pretrain_bad_input_is_one_line_before_training(capsys, tmp_path, args, message):
    run = tmp_path / "run"
    assert main(["pretrain", *args, f"run_dir={run}", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert not run.exists()


def test_pretrain_empty_folder_is_refused(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    assert main(["pretrain", "data.name=unlabelled", f"data.root={tmp_path / 'empty'}", f"run_dir={run}"]) == 2
    assert f"no images found for data.name=unlabelled split=train under {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not run.exists()


def test_eval_errors(capsys, tmp_path):
    assert main(["knn", "--no-progress"]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(["knn", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["knn", "a", "b", "--no-progress"]) == 2
    assert "at most one run" in capsys.readouterr().err
    assert main(["visualize", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_report_without_results(capsys, tmp_path):
    if "report" not in SUBCOMMANDS:
        pytest.skip("no report subcommand")
    assert main(["report", str(tmp_path)]) == 2
    assert "no knn.json, linprobe.json or finetune.json" in capsys.readouterr().err


def _folder(root, write_image):
    for split, n in (("train", 8), ("test", 4)):
        for k, cls in enumerate(("dark", "bright")):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", value=30 + 190 * k + i)
    return root


def test_baseline_evaluations_on_a_folder(tmp_path, write_image, capsys):
    root = _folder(tmp_path / "imgs", write_image)
    data = [f"run_dir={tmp_path / 'runs'}", "data.name=imagefolder", f"data.root={root}", "data.img_size=8",
            "data.channels=3"]
    common = ["--no-progress", "--precision", "fp32", "--batch-size", "4"]
    assert main(["knn", "--baseline", "pixels", *data, *common]) == 0
    # The data are not the default config's: the result's name says so (see test_evaluation_names).
    (knn_file,) = (tmp_path / "runs" / "baseline-pixels").glob("knn-data*.json")
    result = json.loads(knn_file.read_text())
    assert result["top1_k20"] == 100.0 and result["feature_dim"] == 192 and result["dataset"] == "imagefolder"
    assert "k=20: 100.00%" in capsys.readouterr().out
    tiny = ["backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2"]
    assert main(["linprobe", "--baseline", "random", *data, *tiny, *common, "--epochs", "20",
                 "--probe-batch-size", "8"]) == 0
    (lin_file,) = (tmp_path / "runs" / "baseline-random").glob("linprobe-e20-pbs8-data*.json")
    result = json.loads(lin_file.read_text())
    assert result["feature_dim"] == 32 and result["epochs"] == 20 and 0 <= result["top1"] <= 100
    if "report" in SUBCOMMANDS:
        capsys.readouterr()
        assert main(["report", str(tmp_path / "runs")]) == 0
        table = capsys.readouterr().out
        assert re.search(r"^\| raw pixels \(data\w{6}\) \| 100\.00 \| \d+\.\d\d \| - \|$", table, re.M), table
        assert re.search(r"^\| random-init vit_tiny_p4 \(e20-pbs8-data\w{6}\) \| - \| - \| \d+\.\d\d \|$",
                         table, re.M), table
    assert main(["knn", "--baseline", "pixels", *data, *common, "--train-fraction", "0.5", "--k", "1"]) == 0
    (frac_file,) = (tmp_path / "runs" / "baseline-pixels").glob("knn-frac0.5-k1-data*.json")
    result = json.loads(frac_file.read_text())
    assert result["train_fraction"] == 0.5
    capsys.readouterr()
    assert _exit_code(["knn", "--baseline", "pixels", *data, *common, "--train-fraction", "1.5"]) == 2
    assert "--train-fraction" in capsys.readouterr().err


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mimkit", "config", "seed=7"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("mimkit", run_name="__main__")
    assert info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 7


@pytest.mark.fmnist
def test_profile_prints_phases_and_operators(capsys, tiny_run_overrides):
    assert main(["profile", *tiny_run_overrides, "--steps", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    for phase in ("| data |", "| forward |", "| backward |", "| optimizer |"):
        assert phase in out
    ops = [line for line in out.splitlines() if line.startswith("| aten::") or "Optimizer" in line]
    assert 1 <= len(ops) <= 5 and "img/s" in out.splitlines()[0]
    assert main(["profile", *tiny_run_overrides, "--steps", "1", "--top", "30", "--shapes"]) == 0
    assert "| aten::addmm [[" in capsys.readouterr().out  # the linear layers, by their input shapes


def test_eval_settings_come_from_an_eval_config_and_flags_override_it(tmp_path, write_image, capsys):
    root = _folder(tmp_path / "imgs", write_image)
    data = [f"run_dir={tmp_path / 'runs'}", "data.name=imagefolder", f"data.root={root}", "data.img_size=8",
            "data.channels=3"]
    common = ["--no-progress", "--precision", "fp32", "--baseline", "pixels"]
    (tmp_path / "few.yaml").write_text("knn:\n  k: [3]\n  temperature: 0.1\nfeatures:\n  batch_size: 4\n")
    assert main(["knn", *data, *common, "--eval-config", str(tmp_path / "few.yaml")]) == 0
    assert "k=3: 100.00%" in capsys.readouterr().out
    (result,) = (tmp_path / "runs" / "baseline-pixels").glob("knn-k3-T0.1-data*.json")
    assert json.loads(result.read_text())["temperature"] == 0.1
    assert main(["knn", *data, *common, "--eval-config", str(tmp_path / "few.yaml"), "--k", "2"]) == 0
    assert "k=2: " in capsys.readouterr().out
    assert list((tmp_path / "runs" / "baseline-pixels").glob("knn-k2-T0.1-data*.json"))


@pytest.mark.parametrize("argv, new", [
    (["resources", "mae_fmnist", "--batch", "2"], "--batch is now --batch-size"),
    (["finetune", "--scratch", "--arch", "mae_fmnist"], "--arch is now --config"),
])
def test_earlier_flag_names_are_refused_with_the_new_one(argv, new, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert new in err and len(err.strip().splitlines()) == 1


def test_finetune_config_beside_a_run_points_to_finetune_config(tmp_path, capsys):
    """The earlier meaning of finetune's --config (the fine-tuning config) is refused with the new flag."""
    from mimkit.evaluation.finetune import finetune_config

    with pytest.raises(ConfigError, match="a run brings its own; the fine-tuning config is --finetune-config"):
        finetune_config(str(tmp_path), "fmnist", [], arch="fmnist")
