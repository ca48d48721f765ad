"""Loss-curve plots from a run's ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mimkit.engine.logging import read_metrics  # noqa: E402
from mimkit.schema import is_number  # noqa: E402


def save_loss_curve(run_dir: Path, path: Path | None = None) -> Path:
    """Plot training loss (and learning rate) against steps; returns the PNG path.

    A run watched with ``train.eval_every`` gets a second panel: its kNN k=20 accuracy against steps.

    Raises:
        FileNotFoundError: When the run has no logged loss yet.

    """
    metrics = read_metrics(run_dir)
    rows = [r for r in metrics if is_number(r.get("loss"))]
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no loss values in metrics.jsonl")
    knn = [r for r in metrics if is_number(r.get("knn20"))]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(11 if knn else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    if knn:
        axes[0, 1].plot([r["step"] for r in knn], [r["knn20"] for r in knn], "o-", color="tab:green")
        axes[0, 1].set_xlabel("optimizer step")
        axes[0, 1].set_ylabel("kNN k=20 (%)")
        axes[0, 1].set_title(f"kNN on {knn[-1].get('knn_bank', '?')} bank images")
        axes[0, 1].grid(alpha=0.3)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if all(is_number(r.get("lr")) for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = path or run_dir / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


ACCURACY_KEYS = {"knn20": "kNN k=20 (%)", "linprobe": "linear probe (%)"}


def first_minutes_at(rows: list[dict], key: str, threshold: float) -> float | None:
    """Pre-training minutes of the first evaluated checkpoint whose ``key`` reaches ``threshold``.

    Args:
        rows: One dict per checkpoint with ``minutes`` and the accuracy ``key``, in any order.
        key: Accuracy field, e.g. ``"knn20"``.
        threshold: Accuracy to reach, in percent.

    Returns:
        The minutes, or None when no checkpoint reaches it.

    """
    reached = [r["minutes"] for r in rows if r[key] >= threshold]
    return min(reached) if reached else None


def save_accuracy_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Plot frozen-feature accuracy against pre-training minutes, one line per model; returns the PNG path.

    Args:
        curves: Model name to its checkpoints' rows (``minutes``, ``knn20``, ``linprobe``).
        path: Where to write the PNG.
        title: Figure title, e.g. the budget and the evaluation protocol.

    Raises:
        ValueError: When no model has any evaluated checkpoint.

    """
    if not any(curves.values()):
        raise ValueError("no evaluated checkpoints to plot")
    fig, axes = plt.subplots(1, len(ACCURACY_KEYS), figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, ACCURACY_KEYS.items(), strict=True):
        for name, rows in curves.items():
            rows = sorted(rows, key=lambda r: r["minutes"])
            ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xlabel("pre-training minutes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
