#!/bin/bash
# refine.landmark_input: channels (K outputs, the patch's own supervised) vs embedding (the
# landmark index added to the U-Net's time embedding, one output), 2 training seeds each, on the
# same stage 1 as train_design_runs.sh; scored on the development images (never Test1).
export DDPM_LANDMARKS_DATA=${DDPM_LANDMARKS_DATA:-../shared/data} OMP_NUM_THREADS=1
cd "$(git rev-parse --show-toplevel)"
# stage 1: the scratch N = 50 seed-0 cell of the label-efficiency grid (372 s wall)
ddpm-landmarks grid experiments/label-efficiency.yaml --only isbi2015,scratch,N50,s0 refine.finetune=
S1=$(ls -d runs/grids/label-efficiency/cells/isbi2015-scratch-N50-s0-* | head -1)
C="configs/finetune/isbi2015_refine.yaml refine.stage1=$S1 data.image_size=64 model.init=scratch model.pretrained_path= model.preset=patch_lite logger.kind=none run.output_dir=runs/design"
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s user %U s" ddpm-landmarks finetune $C run.name=$name "$@"; }
run channels_s0 train.seed=0
run embedding_s0 train.seed=0 refine.landmark_input=embedding
run channels_s1 train.seed=1
run embedding_s1 train.seed=1 refine.landmark_input=embedding
python experiments/refine_design/design.py runs/design/channels_s0 runs/design/embedding_s0 \
    runs/design/channels_s1 runs/design/embedding_s1 --prior 0 --max-shift none 4 --iterations 1 \
    --out experiments/results/refine_design/eval_c.md
