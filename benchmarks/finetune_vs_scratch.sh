#!/usr/bin/env bash
# Fine-tune a pre-training run's encoder and the same backbone from scratch at an equal time budget,
# side by side with one thread each (the machine has two cores), then print both test top-1 lines.
#   bash benchmarks/finetune_vs_scratch.sh RUN MINUTES [TAG] [key=value ...]
# The two runs land in RUN/finetune-TAG and RUN/finetune-TAG-scratch (resumable: run it again to
# continue an interrupted pair); their logs in RUN/finetune-TAG*.log.
set -euo pipefail
RUN=$1 MINUTES=$2 TAG=${3:-b$2}
shift $(( $# >= 3 ? 3 : 2 ))
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M=(env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m mimkit finetune)
SET=(train.epochs=1000 "train.budget_minutes=$MINUTES" train.progress=false --resume auto "$@")
"${M[@]}" "$RUN" "run_dir=$RUN/finetune-$TAG" "${SET[@]}" > "$RUN/finetune-$TAG.log" 2>&1 &
"${M[@]}" --scratch "$RUN" "run_dir=$RUN/finetune-$TAG-scratch" "${SET[@]}" > "$RUN/finetune-$TAG-scratch.log" 2>&1 &
wait
grep -h "top-1" "$RUN/finetune-$TAG.log" "$RUN/finetune-$TAG-scratch.log"
