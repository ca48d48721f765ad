"""``mimkit transfer``: one checkpoint on several datasets, other sizes and channels, refusals."""

from __future__ import annotations

import json

import pytest

from mimkit.cli import main
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.errors import ConfigError
from mimkit.evaluation.transfer import dataset_overrides, parse_dataset, transfer
from mimkit.models import load_config

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import TINY_RUN_OVERRIDES

    folder = tmp_path_factory.mktemp("transfer") / "mae"
    pretrain(load_config(None, [f"run_dir={folder}", *TINY_RUN_OVERRIDES, "train.epochs=1"]))
    return folder


def _rgb_folder(root, write_image):
    """Three classes of 20x24 RGB images (bright, dark, mid): another size and channel count than the run's."""
    for split, n in (("train", 8), ("test", 4)):
        for k, value in enumerate((220, 30, 120)):
            for i in range(n):
                write_image(root / split / f"c{k}" / f"{i}.png", value=value + i, size=(24, 20))
    return root


def test_one_checkpoint_on_two_datasets(run, tmp_path, write_image, capsys):
    root = _rgb_folder(tmp_path / "rgb", write_image)
    # fine-tuned on a 1 % subset (subset_fraction applies to training, not to the kNN bank or probe)
    specs = ["fashion_mnist:subset_fraction=0.01", f"imagefolder:root={root},img_size=16"]
    assert main(["transfer", str(run), "--datasets", *specs, "--train-fraction", "0.05", "--no-progress",
                 "--precision", "fp32", "--finetune", "train.epochs=2", "optim.batch_size=8"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(latest_checkpoint(run / "checkpoints").glob("transfer-*.json")).read_text())
    fmnist, folder = summary["rows"]
    assert fmnist["classes"] == 10 and fmnist["test_images"] == 10000 and fmnist["train_images"] == 3000
    assert folder["classes"] == 3 and folder["img_size"] == 16 and folder["channels"] == 1
    assert (folder["train_images"], folder["test_images"]) == (3, 12), "a 5 % bank: one image per class"
    assert folder["linprobe"] > 50, "three flat grey levels are easy"
    assert 0 <= folder["finetune"] <= 100 and 0 <= fmnist["finetune"] <= 100
    assert f"| {specs[1]} | 16 | 1 | 3 / 12 | 3 |" in out
    ckpt = latest_checkpoint(run / "checkpoints")
    knn_results = sorted(p.name for p in ckpt.glob("knn-*.json"))
    # the run's own data is the evaluation `mimkit knn --train-fraction 0.05` makes; the folder's is named apart
    assert knn_results == ["knn-frac0.05-data" + knn_results[0][17:], "knn-frac0.05.json"], knn_results
    tuned = sorted(p.name for p in run.glob("finetune-transfer-*"))
    assert len(tuned) == 2 and tuned[0].startswith("finetune-transfer-fashion_mnist")
    # again: the fine-tunings are finished runs, so they are scored, not retrained or refused
    folder_run = run / tuned[1]
    steps = [r["step"] for r in map(json.loads, (folder_run / "metrics.jsonl").read_text().splitlines())]
    assert main(["transfer", str(run), "--datasets", specs[1], "--no-progress", "--precision", "fp32",
                 "--finetune", "train.epochs=2", "optim.batch_size=8"]) == 0
    again = [r["step"] for r in map(json.loads, (folder_run / "metrics.jsonl").read_text().splitlines())]
    assert again == steps, "a finished run is scored again, not trained again"
    # other fine-tuning settings are another run, never a continuation of this one
    assert main(["transfer", str(run), "--datasets", specs[1], "--no-progress", "--precision", "fp32",
                 "--finetune", "train.epochs=1", "optim.batch_size=8"]) == 0
    assert len(list(run.glob("finetune-transfer-imagefolder-*"))) == 2


def test_transfer_refuses_bad_datasets_before_extracting(run, tmp_path, write_image):
    with pytest.raises(ConfigError, match="expected NAME"):
        parse_dataset(":img_size=3")
    with pytest.raises(ConfigError, match="'colour' is not a data setting; valid: root"):
        parse_dataset("cifar10:colour=1")
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_dataset("cifar10:img_size")
    with pytest.raises(ConfigError, match="encoder takes 1 channel"):
        dataset_overrides("cifar10:channels=3", 1, [])
    ckpt = latest_checkpoint(run / "checkpoints")
    before = sorted(ckpt.iterdir())
    with pytest.raises(ConfigError, match="data.root: folder not found"):
        transfer(str(run), ["fashion_mnist:img_size=24", f"imagefolder:root={tmp_path / 'nowhere'}"], progress=False)
    assert sorted(ckpt.iterdir()) == before, "nothing extracted or written"
    with pytest.raises(ConfigError, match="apply with --finetune only"):
        transfer(str(run), ["fashion_mnist"], finetune_overrides=["train.epochs=1"], progress=False)
