#!/usr/bin/env bash
# Set up, then the main job on the built-in default: pre-train an MAE on Fashion-MNIST on the CPU,
# evaluate it with kNN and a linear probe beside the raw-pixel baseline, and save reconstructions.
# Extra key=value arguments go to `mimkit pretrain` (e.g. train.epochs=5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
M=.venv/bin/mimkit
CONFIG=${CONFIG:-mae_fmnist}
RUN=$($M config --config "$CONFIG" "$@" | sed -n 's/^run_dir: //p')
$M pretrain --config "$CONFIG" --resume auto "$@"
$M knn "$RUN"
$M linprobe "$RUN"
$M knn "$RUN" --baseline pixels
$M linprobe "$RUN" --baseline pixels
$M visualize "$RUN"
echo
$M report "$RUN"
echo "reconstructions: $RUN/reconstructions.png   loss curve: $RUN/loss_curve.png"
