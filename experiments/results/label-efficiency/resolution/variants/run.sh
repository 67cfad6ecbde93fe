#!/bin/bash
# Refinement variants re-trained on finished stage-1 runs (issue 15), each from the saved config
# of the shipped refinement of that run (grid 512, patch_lite, 500 steps) plus one override;
# evaluated on Test1 afterwards. Chosen on validation (compare.py). One thread: run it beside a
# second runner on a 2-core machine. Skips what is done. ONLY=<text> keeps the runs whose key
# (e.g. scratch-s0) contains it.
#   experiments/results/label-efficiency/resolution/variants/run.sh 128 steps1000 train.max_steps=1000
#   experiments/results/label-efficiency/resolution/variants/run.sh 64 steps1000 train.max_steps=1000
set -u
export DDPM_LANDMARKS_DATA=${DDPM_LANDMARKS_DATA:-../shared/data} OMP_NUM_THREADS=1
size=$1; name=$2; shift 2
C128=runs/grids/label-efficiency-128/cells
C64=runs/grids/label-efficiency/cells
if [ "$size" = 128 ]; then
  out_dir=runs/variants128
  bases=(s0=$C128/isbi2015-scratch-N50-s0-1d4bbfe0/refine-65b614c2
         s1=$C128/isbi2015-scratch-N50-s1-671606ba/refine-14d375d7
         s2=$C128/isbi2015-scratch-N50-s2-dc1be3ea/refine-855af33b)
else
  out_dir=runs/variants64
  bases=(scratch-s0=$C64/isbi2015-scratch-N50-s0-b259f64d/refine-e52274c2
         scratch-s1=$C64/isbi2015-scratch-N50-s1-d1efb66a/refine-48054e81
         scratch-s2=$C64/isbi2015-scratch-N50-s2-806e4ee5/refine-1c11aec5
         ddpm-s0=$C64/isbi2015-ddpm-N50-s0-ab8a994d/refine-bb39f933
         ddpm-s1=$C64/isbi2015-ddpm-N50-s1-1fca798d/refine-19feb8d9
         ddpm-s2=$C64/isbi2015-ddpm-N50-s2-0489e4b0/refine-808e507b
         ddpm_long-s0=$C64/isbi2015-ddpm_long-N50-s0-475f1ee0/refine-5ff22dd8
         ddpm_long-s1=$C64/isbi2015-ddpm_long-N50-s1-bce40d36/refine-43fecde4
         ddpm_long-s2=$C64/isbi2015-ddpm_long-N50-s2-d40343a8/refine-50d210fd)
fi
for entry in "${bases[@]}"; do
  key=${entry%%=*}; base=${entry#*=}
  [[ "$key" == *"${ONLY:-}"* ]] || continue
  run="$name-$key"
  [ -f "$out_dir/$run/eval_test1/metrics.json" ] && continue
  rm -rf "$out_dir/$run"                      # a half-finished try starts again
  t0=$(date +%s)
  .venv/bin/ddpm-landmarks finetune "$base/config.yaml" run.output_dir=$out_dir run.name=$run \
      logger.kind=none "$@" > "$out_dir.$run.log" 2>&1 || { echo "FAILED $run"; continue; }
  .venv/bin/ddpm-landmarks evaluate "$out_dir/$run" --split test1 >> "$out_dir.$run.log" 2>&1 \
      || { echo "FAILED evaluate $run"; continue; }
  echo "$run $(( $(date +%s) - t0 )) s"
done
