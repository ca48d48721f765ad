"""A folder of colour photographs at their own sizes, tried as a new user would: a packaged config and
the folder's path, the kNN curve while it trains, the pictures, the export through timm's own
loader, a run continued from timm's weights, and a torch ``Dataset`` from Python."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.data import resolve_model_data_config
from timm.models import save_for_hf

import mimkit
from mimkit.cli import main
from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.engine.logging import read_metrics

pytestmark = pytest.mark.slow

#: Images per class: a few hundred in all.
TRAIN, VAL = 140, 6


def _photos(root, seed: int = 0):
    """Two classes of colour images of mixed sizes and formats (a red-ish and a blue-ish kind)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", TRAIN), ("val", VAL)):
        for c, name in enumerate(("reds", "blues")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(40, 130, size=2))
                base = np.array([200, 60, 40] if c == 0 else [40, 80, 200])
                arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.{'jpg' if i % 3 else 'png'}")
    return root


def test_a_colour_folder_with_a_packaged_config_and_nothing_else(tmp_path, monkeypatch, capsys):
    root = _photos(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    # The folder's path is the only data or model setting; one step of 64 and a watch for the test's sake.
    watch = ["train.epochs=0.25", "optim.batch_size=64", "train.progress=false", "train.log_every=1",
             "train.eval_every=1"]
    assert main(["pretrain", "--config", "mae_vits_rgb64", f"data.root={root}", *watch]) == 0
    run = tmp_path / "runs" / "mae_vits_rgb64-photos"
    assert "mae_vits_rgb64-photos" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (saved["img_size"], saved["channels"], saved["name"]) == (64, 3, "folder")
    # The stored normalisation: a red class and a blue class, so red's mean is above blue's.
    assert len(saved["mean"]) == 3 and len(saved["std"]) == 3 and saved["mean"][0] > saved["mean"][2]

    # the kNN curve in the log and in TensorBoard, while it trained
    assert [r["step"] for r in read_metrics(run) if "knn20" in r] == [1]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn20")] == [1]

    # the pictures
    assert main(["visualize", str(run), "--attention", "--num", "4"]) == 0
    for name in ("reconstructions.png", "attention.png", "pca.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the export, read by timm's own loader: the same features, and the stored normalisation
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    encoder = mimkit.load_encoder(tmp_path / "export")
    model = timm.create_model(f"local-dir:{tmp_path / 'export' / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), ours,
                                   atol=1e-5, rtol=1e-5)
    data = resolve_model_data_config(model)
    assert data["input_size"] == (3, 64, 64) and list(data["mean"]) == pytest.approx(saved["mean"])

    # a run started from timm's own ViT-S/8 weights (saved by timm, with its learned position embedding) trains
    args = dict(img_size=64, patch_size=8, num_classes=0)
    save_for_hf(timm.create_model("vit_small_patch16_224", pretrained=False, **args), tmp_path / "timm_vits8",
                model_args=args, safe_serialization=True)
    init = f"init=local-dir:{tmp_path / 'timm_vits8'}"
    assert main(["pretrain", "--config", "mae_vits_rgb64", f"data.root={root}", init, "backbone.pos_embed=learned",
                 "run_dir=runs/from_timm", "train.epochs=0.25", "optim.batch_size=64", "train.progress=false",
                 "train.log_every=1"]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "runs" / "from_timm") if "loss" in r]
    assert losses and all(np.isfinite(losses))
    assert latest_checkpoint(tmp_path / "runs" / "from_timm" / "checkpoints") is not None


def test_a_torch_dataset_trains_from_python(tmp_path):
    """Any map-style Dataset of images: the run records that its data came from Python."""

    class Squares(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int):
            img = torch.zeros(3, 20 + i % 7, 24, dtype=torch.uint8)
            img[i % 3, 4:12, 4:12] = 255
            return img, i % 2

    overrides = [f"run_dir={tmp_path / 'run'}", "data.img_size=16", "data.channels=3", "backbone.embed_dim=32",
                 "backbone.depth=1", "backbone.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                 "method.decoder_heads=2", "optim.batch_size=16", "train.progress=false", "train.log_every=1",
                 "train.precision=fp32", "train.device=cpu"]
    run = mimkit.pretrain(mimkit.load_config("mae_fmnist", [*overrides, "train.epochs=1"]), dataset=Squares())
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["name"] == "torch_dataset" and len(saved["mean"]) == 3
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 4
    # continued exactly as any run: the same Dataset, the same settings
    more = mimkit.load_config("mae_fmnist", [*overrides, "train.epochs=2"])
    assert mimkit.pretrain(more, resume="auto", dataset=Squares()) == run
    assert latest_checkpoint(run / "checkpoints").name == "step_00000008"
