#!/usr/bin/env bash
# Set up, then the main job on the built-in default: pre-train the hybrid CvT-MAE on Fashion-MNIST on
# the CPU for a few minutes, evaluate it with kNN and a linear probe beside the raw-pixel baseline,
# and save reconstructions.
#   CONFIG=mae_fmnist bash scripts/quickstart.sh      # the plain ViT MAE instead (cvt_mae_fmnist: CvT stride 2)
#   MINUTES=25 bash scripts/quickstart.sh             # a longer pre-training budget (default 10)
#   MINUTES=0 bash scripts/quickstart.sh train.epochs=5   # schedule by epochs, no time budget
#   FRACTION=1 bash scripts/quickstart.sh             # evaluate with the whole train split
# Extra key=value arguments go to `mimkit pretrain`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
M=.venv/bin/mimkit
CONFIG=${CONFIG:-cvt_mae_fmnist_s4}
MINUTES=${MINUTES:-10}
# A per-class 20 % of the train split as kNN bank / probe training set keeps evaluation to a minute or
# two; the full 10,000-image test set is always used.
FRACTION=${FRACTION:-0.2}
BUDGET=()
if [ "$MINUTES" != "0" ]; then BUDGET=(train.epochs=1000 "train.budget_minutes=$MINUTES"); fi
RUN=$($M config --config "$CONFIG" "${BUDGET[@]}" "$@" | sed -n 's/^run_dir: //p')
$M pretrain --config "$CONFIG" --resume auto "${BUDGET[@]}" "$@"
for what in knn linprobe; do
  $M $what "$RUN" --train-fraction "$FRACTION"
  $M $what "$RUN" --train-fraction "$FRACTION" --baseline pixels
done
$M visualize "$RUN"
echo
$M report "$RUN"
echo "reconstructions: $RUN/reconstructions.png   loss curve: $RUN/loss_curve.png"
