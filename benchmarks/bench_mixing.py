"""Mixed-input masked image modeling against its controls on Fashion-MNIST at an equal CPU budget.

The protocol of ``bench_teacher_student.py`` (``cells.budget_comparison``): each model pre-trains for
``--budget-min`` minutes with checkpoints along the way (kNN and linear probe on a 20 % bank against
minutes), the last checkpoint is evaluated with the full protocol beside raw pixels and fine-tuned,
and ``mimkit resources`` measures training images/s and peak memory. The final table adds MixedAE's
homologous recognition accuracy per block (the mean of the last logged values).

    MAE (ViT, 32 px)                         the masked-token baseline with MixedAE's encoder and input size
    MixedAE (ViT)                            groups of four, segment embedding, homologous attention and contrast
    MixedAE without segment embedding (ViT)  the same, nothing naming a token's image
    naive mixing (ViT)                       the same groups without the three additions
    MixMAE (Swin)                            pairs on the 7x7 last-stage grid, attention within each image
    MixMAE (CvT)                             the same on the stride-4 CvT with a stride-1 last stage
    CvT-MAE (4-2-1)                          the masked-pixel baseline on that same CvT (``cvt_mae_fmnist_s4_421``)
    CvT-MAE with MixMAE's 7 px cells (4-2-1) the same with holes as large as MixMAE's cells

Usage (two models side by side, one core each, then a last call for the tables and the figure):
    python benchmarks/bench_mixing.py --budget-min 30 --threads 1 --shard 0/2 --out RUNS
    python benchmarks/bench_mixing.py --budget-min 30 --threads 1 --shard 1/2 --out RUNS
    python benchmarks/bench_mixing.py --budget-min 30 --out RUNS
"""

from __future__ import annotations

import statistics
from pathlib import Path

from cells import Cell, budget_comparison

from mimkit.engine.logging import read_metrics

MODELS = [
    Cell("MAE (ViT, 32 px)", "mae_fmnist_32"),
    Cell("MixedAE (ViT)", "mixedae_fmnist"),
    Cell("MixedAE without segment embedding (ViT)", "mixedae_noseg_fmnist"),
    Cell("naive mixing (ViT)", "mixedae_naive_fmnist"),
    Cell("MixMAE (Swin)", "mixmae_swin_fmnist"),
    Cell("MixMAE (CvT)", "mixmae_cvt_fmnist"),
    Cell("CvT-MAE (4-2-1)", "cvt_mae_fmnist_s4_421"),
    Cell("CvT-MAE with MixMAE's 7 px cells (4-2-1)", "cvt_mae_fmnist_s4_421_m7"),
]


def recognition(cell: Cell, run_dir: Path, last: int = 10) -> dict[str, str]:
    """MixedAE's homologous recognition per block: the mean of the run's last ``last`` logged values."""
    rows = [r for r in read_metrics(run_dir) if any(k.startswith("homologous_recognition/") for k in r)]
    if not rows:
        return {}
    keys = sorted({k for r in rows for k in r if k.startswith("homologous_recognition/")},
                  key=lambda k: int(k.rsplit("/", 1)[1]))
    per_block = [statistics.fmean([r[k] for r in rows if k in r][-last:]) for k in keys]
    return {"homologous recognition (per block)": " / ".join(f"{100 * v:.0f}" for v in per_block)}


if __name__ == "__main__":
    budget_comparison(__doc__, MODELS, "runs/mixing", extra=recognition)
