#!/bin/bash
export DDPM_LANDMARKS_DATA=/work/shared/data OMP_NUM_THREADS=1
cd "$(git rev-parse --show-toplevel)"
S1=runs/grids/label-efficiency/cells/isbi2015-scratch-N50-s0-15cfab00
C="configs/finetune/isbi2015_refine.yaml refine.stage1=$S1 data.image_size=64 model.init=scratch model.pretrained_path= model.preset=patch_lite logger.kind=none run.output_dir=runs/design"
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s user %U s" python -m ddpm_landmarks.cli.main finetune $C run.name=$name "$@"; }
run p32 
run p24 refine.patch_size=24
run p32_visible refine.supervise=visible
run p32_jitter2 refine.jitter_scale=2.0
run g512_p48 refine.grid=512 refine.patch_size=48 heatmap.sigma=2.0
