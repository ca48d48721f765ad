"""The README's first command (the stride-4 CvT-MAE) under other recipes, at a fixed number of images.

A host without native bf16 trains the quickstart in fp32 and makes fewer steps in its 10 minutes than
an AVX512-BF16 host. To compare recipes for such a host on any host, fix the images instead of the
minutes (``train.budget_minutes=0 train.epochs=E``: the schedule is fitted to the epochs) and the
precision (``train.precision=fp32``), then evaluate as ``budget_comparison`` does (curve on a 20 %
bank, which is the quickstart's protocol; full protocol at the end).

    CvT-MAE (stride 4) as packaged (no crop); with its earlier crop 0.35-1, and with that crop: two
    higher and a lower learning rate, mask ratio 0.75 and 0.35, batch 128 (twice the steps for the same
    images, the learning rate scaled with the batch as always), pre-training on 20 or 16 px crops
    evaluated at 28 px; crop scale 0.6-1, 0.8-1, and no crop (the flip alone)

Usage (two cells side by side, one core each, then a last call for the tables), at the 1818 steps
of 256 images (7.76 epochs) that an AVX2-only host made in the 10-minute quickstart:
    python benchmarks/bench_quickstart.py --budget-min 10 --finetune-min 0 --threads 1 --shard 0/2 \\
        --out RUNS train.budget_minutes=0 train.epochs=7.76 train.precision=fp32
    python benchmarks/bench_quickstart.py ... --shard 1/2 ...   (the same, beside it)
    python benchmarks/bench_quickstart.py --budget-min 10 --finetune-min 0 --out RUNS \\
        train.budget_minutes=0 train.epochs=7.76 train.precision=fp32
(``--budget-min`` then only spaces the curve's checkpoints.)
"""

from __future__ import annotations

from cells import NO_CROP, Cell, budget_comparison, crop

#: The crop the stride-4 config had until section 24 of BENCHMARKS.md; the recipes of section 23 keep it.
CROP_035 = crop(0.35)

MODELS = [
    Cell("CvT-MAE (stride 4)", "cvt_mae_fmnist_s4"),
    Cell("CvT-MAE (stride 4, crop 0.35-1)", "cvt_mae_fmnist_s4", [CROP_035]),
    Cell("CvT-MAE (stride 4, lr 2e-3)", "cvt_mae_fmnist_s4", [CROP_035, "optim.base_lr=2e-3"]),
    Cell("CvT-MAE (stride 4, lr 5e-4)", "cvt_mae_fmnist_s4", [CROP_035, "optim.base_lr=5e-4"]),
    Cell("CvT-MAE (stride 4, lr 3e-3)", "cvt_mae_fmnist_s4", [CROP_035, "optim.base_lr=3e-3"]),
    Cell("CvT-MAE (stride 4, mask 0.75)", "cvt_mae_fmnist_s4", [CROP_035, "method.mask_ratio=0.75"]),
    Cell("CvT-MAE (stride 4, batch 128)", "cvt_mae_fmnist_s4", [CROP_035, "optim.batch_size=128"]),
    # Pre-training on smaller crops, evaluated at 28 px: fewer pixels per image buy more images per
    # minute (section 7). Run these with the number of images such a host makes at their size, i.e.
    # train.epochs scaled by the fp32 images/s of `mimkit resources` at that size against 28 px.
    Cell("CvT-MAE (stride 4, 20 px crops)", "cvt_mae_fmnist_s4", [CROP_035, "data.img_size=20"], ["data.img_size=28"]),
    Cell("CvT-MAE (stride 4, 16 px crops, mask 2)", "cvt_mae_fmnist_s4",
         [CROP_035, "data.img_size=16", "method.mask_size=2"], ["data.img_size=28"]),
    Cell("CvT-MAE (stride 4, 16 px crops)", "cvt_mae_fmnist_s4", [CROP_035, "data.img_size=16"], ["data.img_size=28"]),
    Cell("CvT-MAE (stride 4, mask 0.35)", "cvt_mae_fmnist_s4", [CROP_035, "method.mask_ratio=0.35"]),
    # Fashion-MNIST's test images are whole, centred objects; a milder crop keeps training closer to them.
    Cell("CvT-MAE (stride 4, crop 0.6-1)", "cvt_mae_fmnist_s4", [crop(0.6)]),
    Cell("CvT-MAE (stride 4, crop 0.8-1)", "cvt_mae_fmnist_s4", [crop(0.8)]),
    Cell("CvT-MAE (stride 4, no crop)", "cvt_mae_fmnist_s4", [NO_CROP]),
]

if __name__ == "__main__":
    budget_comparison(__doc__, MODELS, "runs/quickstart")
