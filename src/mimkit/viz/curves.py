"""Loss-curve plots from a run's ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mimkit.engine.logging import read_metrics  # noqa: E402


def save_loss_curve(run_dir: Path, path: Path | None = None) -> Path:
    """Plot training loss (and learning rate) against steps; returns the PNG path.

    Raises:
        FileNotFoundError: When the run has no logged loss yet.

    """
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no loss values in metrics.jsonl")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = path or run_dir / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
