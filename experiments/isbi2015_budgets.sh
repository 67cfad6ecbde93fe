#!/usr/bin/env bash
# ISBI 2015 label-efficiency sweep: fine-tune with N = 1, 5, 10, 25, 50 and all 150 labelled
# images, evaluate each on Test1. Extra arguments are passed to every fine-tuning run, e.g.
#   experiments/isbi2015_budgets.sh model.pretrained_path=runs/pretrain_isbi2015/export
#   experiments/isbi2015_budgets.sh model.init=scratch                      # the scratch baseline
# Prefix with `accelerate launch -m ddpm_landmarks.finetune --config` style by setting
#   FINETUNE="accelerate launch -m ddpm_landmarks.finetune --config"
set -euo pipefail
CONFIG=${CONFIG:-configs/finetune/isbi2015.yaml}
FINETUNE=${FINETUNE:-ddpm-landmarks finetune}
PREFIX=${PREFIX:-isbi2015}
for N in 1 5 10 25 50; do
  $FINETUNE "$CONFIG" fewshot.budget=$N run.name=${PREFIX}_N$N "$@"
  ddpm-landmarks evaluate runs/${PREFIX}_N$N --split test1
done
# All 150 labels: nothing is left for validation, so a fixed schedule and the last weights.
$FINETUNE "$CONFIG" fewshot.budget=null fewshot.val_policy=none train.eval_every=0 \
  train.early_stopping_patience=0 run.name=${PREFIX}_all "$@"
ddpm-landmarks evaluate runs/${PREFIX}_all --split test1
