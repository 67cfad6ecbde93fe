#!/usr/bin/env bash
# The model of the committed uncertainty study (experiments/results/uncertainty/): the
# cpu-small protocol's scratch cell (ISBI 2015 at 64 px, U-Net `small` from scratch, 50 labels
# drawn with seed 0, 10 more Train images for validation, 500 steps of batch 8), one seed.
# Scratch rather than DDPM: experiments/results/cpu-small shows the two equal at this CPU
# budget, and scratch needs no pretraining. ~5 min on 2 CPU cores.
#
#   experiments/uncertainty/train_isbi_n50.sh [RUN_DIR] [extra overrides]
set -euo pipefail
run_dir=${1:-runs/uncertainty/isbi_scratch_n50}
shift || true
exec ddpm-landmarks finetune configs/finetune/isbi2015.yaml \
  fewshot.budget=50 fewshot.seed=0 fewshot.draw=0 \
  model.init=scratch model.pretrained_path= model.preset=small \
  data.image_size=64 heatmap.sigma=1.5 train.mixed_precision=bf16 train.max_steps=500 \
  train.batch_size=8 train.eval_every=50 train.early_stopping_patience=0 \
  train.checkpoint_every=100 train.num_workers=1 train.image_every=0 optim.warmup_steps=20 \
  logger.kind=none \
  run.output_dir="$(dirname "$run_dir")" run.name="$(basename "$run_dir")" "$@"
