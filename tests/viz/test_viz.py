from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mimkit.data.transforms import Normalize
from mimkit.engine.logging import RunLogger, read_metrics
from mimkit.viz import (
    first_minutes_at,
    reconstruction_panels,
    save_accuracy_curves,
    save_loss_curve,
    save_reconstructions,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NORM = Normalize([0.3], [0.35])


def _images(n=3):
    uint8 = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return NORM(uint8)


def test_reconstruction_panels(tiny_mae):
    images = _images()
    torch.manual_seed(0)
    original, masked, shown, pasted = reconstruction_panels(tiny_mae, images, NORM)
    assert not tiny_mae.training
    for panel in (original, masked, shown, pasted):
        assert panel.shape == images.shape
        assert panel.min() >= 0 and panel.max() <= 1
    torch.testing.assert_close(original, NORM.denormalize(images))
    hidden = masked == 0.5
    # 37 of 49 patches of 16 pixels are hidden (grey) in the masked input
    frac = (masked == 0.5).float().mean().item()
    assert frac == pytest.approx(37 / 49, abs=0.02)
    visible = ~hidden
    torch.testing.assert_close(pasted[visible], original[visible])
    torch.testing.assert_close(pasted[hidden], shown[hidden])


def test_save_reconstructions_png(tmp_path, tiny_mae):
    path = save_reconstructions(tiny_mae, _images(4), NORM, tmp_path / "sub" / "recon.png", title="tiny")
    assert path == tmp_path / "sub" / "recon.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000
    with Image.open(path) as img:
        w, h = img.size
    assert w > 200 and h > 200


def _write_metrics(run_dir, n=10):
    logger = RunLogger(run_dir, tensorboard=False)
    for step in range(1, n + 1):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3 * step / n})
    logger.log(n, {"skipped_nonfinite": 1})
    logger.close()


def test_save_loss_curve(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 11, "loss"')  # a torn line from a killed run
    rows = read_metrics(run)
    assert len(rows) == 11 and rows[0]["step"] == 1 and json.dumps(rows[-1])
    path = save_loss_curve(run)
    assert path == run / "loss_curve.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    other = save_loss_curve(run, tmp_path / "curve.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_save_loss_curve_without_losses(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="no loss"):
        save_loss_curve(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "skipped_nonfinite": 1}\n')
    with pytest.raises(FileNotFoundError):
        save_loss_curve(run)


CURVES = {
    "vit-mae": [{"minutes": 10.0, "knn20": 76.0, "linprobe": 80.0}, {"minutes": 5.0, "knn20": 72.0, "linprobe": 77.0},
                {"minutes": 20.0, "knn20": 79.5, "linprobe": 82.8}],
    "cvt-mae": [{"minutes": 10.4, "knn20": 75.1, "linprobe": 81.2}, {"minutes": 20.7, "knn20": 78.5, "linprobe": 82.4}],
}


def test_first_minutes_at():
    assert first_minutes_at(CURVES["vit-mae"], "knn20", 76.0) == 10.0  # the first reaching, not the first listed
    assert first_minutes_at(CURVES["cvt-mae"], "linprobe", 81.0) == 10.4
    assert first_minutes_at(CURVES["cvt-mae"], "knn20", 79.0) is None


def test_save_accuracy_curves(tmp_path):
    path = save_accuracy_curves(CURVES, tmp_path / "sub" / "curves.png", "40 min")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10000
    with pytest.raises(ValueError, match="no evaluated"):
        save_accuracy_curves({"a": []}, tmp_path / "empty.png")
