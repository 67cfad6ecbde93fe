#!/usr/bin/env bash
# Source ranking before fine-tuning (issue 7, item 2), after Li et al., "Finding the most
# transferable tasks for brain image segmentation" (2023), validated against fine-tuning.
#
#   bash experiments/source-ranking.sh          # CPU: a few minutes, after the grids below
#
# Target: ISBI 2015 with 50 labels at 64 px (the grids' fine-tuning resolution and heatmap
# sigma; the few-shot draw of seed 0). Candidates: every pretrained model the CPU grids made
# (DDPM, SimCLR, MoCo v3 exports, the curriculum and cross-anatomy DDPM exports, the 3-channel
# SimCLR export, the two spine-supervised regressors) and the random-init floors of the three
# architectures. Validation: Spearman's rho between each candidate's LogME and the Test1 MRE of
# the grid cells fine-tuned from it, per grid (one fine-tuning protocol each) and pooled. The
# like-with-like number is experiments/source-ranking.yaml's grid: every candidate fine-tuned
# on one protocol; the other grids add their own (fewer candidates each).
#
# It reads the grids' folders, so run them first (each skips what is done; source-ranking.yaml
# last, its checkpoints are the others' outputs):
#   ddpm-landmarks grid experiments/cpu-small.yaml
#   ddpm-landmarks grid experiments/curriculum.yaml
#   ddpm-landmarks grid experiments/transfer-cross-anatomy.yaml
#   ddpm-landmarks grid experiments/transfer-in-domain.yaml
#   ddpm-landmarks grid experiments/gray-adapters.yaml
#   ddpm-landmarks grid experiments/source-ranking.yaml
# Result committed in experiments/results/source-ranking/.
set -euo pipefail
GRIDS=${GRIDS:-runs/grids}
OUT=${OUT:-runs/rank_sources/isbi2015-N50-64px}

shopt -s nullglob
candidates=(
  "$GRIDS"/cpu-small/pretrain/*/export
  "$GRIDS"/curriculum/pretrain/*/export
  "$GRIDS"/transfer-cross-anatomy/pretrain/*/export
  "$GRIDS"/gray-adapters/pretrain/*/export
  "$GRIDS"/transfer-in-domain/sources/*/best
  random:ddpm_unet:small random:ddpm_unet:tiny random:smp_encoder:resnet18
)
grids=()
for name in source-ranking cpu-small curriculum transfer-cross-anatomy transfer-in-domain gray-adapters; do
  [[ -d "$GRIDS/$name/cells" ]] && grids+=("$GRIDS/$name")
done

ddpm-landmarks rank-sources --target configs/finetune/isbi2015.yaml \
  data.image_size=64 heatmap.sigma=1.5 fewshot.budget=50 \
  --candidates "${candidates[@]}" --validate "${grids[@]}" --out "$OUT" "$@"
