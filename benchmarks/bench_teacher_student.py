"""Teacher-student methods against masked image modeling on Fashion-MNIST at an equal CPU budget.

Each model pre-trains for ``--budget-min`` minutes (``train.budget_minutes``) with ``--curve-points``
evenly spaced checkpoints, each evaluated with kNN (k = 20, 200) and the linear probe on a per-class
``--train-fraction`` of the train split (the curve of accuracy against minutes); the last one is then
evaluated with the full protocol (the whole train split as bank and probe set) beside raw pixels,
and fine-tuned for ``--finetune-min`` minutes. ``mimkit resources`` measures every config's training
images/s and peak memory in its own process.

    MAE (ViT), CvT-MAE (stride 4), DINO (ViT), DINO (CvT), DINO (ViT micro), iBOT (ViT)

Usage (two models side by side, one core each, then a last call for the tables and the figure):
    python benchmarks/bench_teacher_student.py --budget-min 30 --threads 1 --shard 0/2 --out RUNS
    python benchmarks/bench_teacher_student.py --budget-min 30 --threads 1 --shard 1/2 --out RUNS
    python benchmarks/bench_teacher_student.py --budget-min 30 --out RUNS
"""

from __future__ import annotations

from cells import Cell, budget_comparison

MODELS = [
    Cell("MAE (ViT)", "mae_fmnist"),
    Cell("CvT-MAE (stride 4)", "cvt_mae_fmnist_s4"),
    Cell("DINO (ViT)", "dino_fmnist"),
    Cell("DINO (CvT)", "dino_cvt_fmnist"),
    Cell("DINO (ViT micro)", "dino_micro_fmnist"),
    Cell("iBOT (ViT)", "ibot_fmnist"),
]

if __name__ == "__main__":
    budget_comparison(__doc__, MODELS, "runs/teacher_student")
