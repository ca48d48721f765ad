"""Pre-train a tiny MAE on a Fashion-MNIST subset through the CLI, then evaluate and visualise it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mimkit.cli import build_parser, main
from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.engine.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]

def _subcommands() -> set[str]:
    return set(next(a for a in build_parser()._actions if a.dest == "command").choices)


EVAL = ["--no-progress", "--precision", "fp32", "--device", "cpu"]


def test_pretrain_evaluate_visualize(tmp_path, capsys, tiny_run_overrides):
    run = tmp_path / "mae_tiny"
    assert main(["pretrain", f"run_dir={run}", *tiny_run_overrides, "train.epochs=2"]) == 0
    assert f"run folder: {run}" in capsys.readouterr().out

    # the loss falls over the 36 steps
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000036"
    assert (run / "config.yaml").is_file()

    # kNN on frozen features of the full Fashion-MNIST (60k bank, 10k queries)
    assert main(["knn", str(run), *EVAL]) == 0
    knn = json.loads((ckpt / "knn.json").read_text())
    assert knn["subject"] == "mae step_00000036" and knn["dataset"] == "fashion_mnist"
    assert knn["feature_dim"] == 32
    assert knn["top1_k20"] > 30.0 and knn["top1_k200"] > 30.0  # chance is 10%
    assert len(list(ckpt.glob("features-*.pt"))) == 1
    assert "k=20:" in capsys.readouterr().out

    # the linear probe reuses the cached features
    assert main(["linprobe", str(run), *EVAL, "--epochs", "10"]) == 0
    lin = json.loads((ckpt / "linprobe-e10.json").read_text())
    assert lin["top1"] > 30.0 and lin["epochs"] == 10
    assert len(list(ckpt.glob("features-*.pt"))) == 1
    assert "top-1" in capsys.readouterr().out

    # figures
    assert main(["visualize", str(run), "--num", "4"]) == 0
    for name in ("reconstructions.png", "loss_curve.png"):
        path = run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        with Image.open(path) as img:
            assert min(img.size) > 100

    # a data override: the same encoder on 32-pixel inputs (its position embedding is recomputed)
    assert main(["knn", str(run), "data.channels=1", "data.img_size=32", *EVAL, "--train-fraction", "0.1",
                 "--k", "20"]) == 0
    # every setting that changes the result is in its name: nothing overwrites the full-protocol kNN
    (small_file,) = ckpt.glob("knn-frac0.1-k20-data*.json")
    small = json.loads(small_file.read_text())
    assert small["data_changes"] == {"img_size": 32}
    assert json.loads((ckpt / "knn.json").read_text()) == knn
    assert small["img_size"] == 32 and small["top1_k20"] > 20.0
    capsys.readouterr()
    # the tiny encoder has one block: asking for two is refused before any extraction
    assert main(["knn", str(run), *EVAL, "--blocks", "2"]) == 2
    assert "--blocks 2: indices must be in [1, 1]" in capsys.readouterr().err

    if "report" in _subcommands():
        assert main(["report", str(run)]) == 0
        table = capsys.readouterr().out
        assert f"| mae step_00000036 | {knn['top1_k20']:.2f} | {knn['top1_k200']:.2f} | - |" in table
        assert f"| mae step_00000036 (e10) | - | - | {lin['top1']:.2f} |" in table
        # the 10 %-bank kNN at 32 px is its own row, with no linear probe
        variant = small_file.stem.split("-", 1)[1]
        assert f"| mae step_00000036 ({variant}) | {small['top1_k20']:.2f} | - | - |" in table


def test_cvt_mae_pretrain_evaluate_visualize(tmp_path, capsys):
    """The hybrid CvT-MAE through the same CLI: loss falls, kNN on the frozen CvT, reconstructions."""
    run = tmp_path / "cvt_tiny"
    tiny = ["--config", "cvt_mae_fmnist", f"run_dir={run}", "data.subset_fraction=0.01", "optim.batch_size=32",
            "optim.base_lr=4e-3", "optim.warmup_epochs=0.25", "backbone.dims=[8,16,32]", "backbone.depths=[1,1,1]",
            "backbone.num_heads=[1,1,2]", "train.precision=fp32", "train.device=cpu", "train.progress=false",
            "train.log_every=3", "train.epochs=2"]
    assert main(["pretrain", *tiny]) == 0
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_00000036"
    assert main(["knn", str(run), *EVAL, "--train-fraction", "0.1", "--k", "20"]) == 0
    knn = json.loads((ckpt / "knn-frac0.1-k20.json").read_text())
    assert knn["subject"] == "cvt_mae step_00000036" and knn["feature_dim"] == 32
    assert knn["top1_k20"] > 30.0
    assert main(["visualize", str(run), "--num", "4"]) == 0
    assert (run / "reconstructions.png").stat().st_size > 5000
    capsys.readouterr()
