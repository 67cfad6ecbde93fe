"""A check, not part of the framework: is a space-to-depth local network as accurate as
`patch_lite` at about a third to a half of its cost? (issue 15, the +50 % speed bound.) It
answered yes for widths 16,32,32, which became the preset `patch_fold` (models/unet.py); this
script stays as the command behind the `try_space_to_depth.py` rows of results.md.

The U-Net runs on the 32 px patch folded into 2 x 2 blocks (pixel_unshuffle: 4 channels at
16 px) and its 4K outputs are unfolded back (pixel_shuffle: K heatmaps at 32 px), so every
level runs at half the resolution (a quarter of the pixels) while the input and the heatmaps
keep the patch's full resolution. Patched into HeatmapRegressor for this process only (scratch
init: no DDPM pretraining exists for it), trained exactly as variants/run.sh trains a
refinement (the saved config of the cell's refinement plus overrides), and evaluated on Test1
in the same process:

    .venv/bin/python experiments/results/label-efficiency/speed/try_space_to_depth.py \
        <refine config.yaml> <run name> <widths, e.g. 16,32,32> [overrides ...]
"""
from __future__ import annotations

import copy
import sys
import types

import torch.nn.functional as F
from torch import nn

from ddpm_landmarks.cli.main import main
from ddpm_landmarks.models import regressor as R
from ddpm_landmarks.models import unet as U


def install(widths: tuple[int, ...]) -> None:
    """Preset `patch_s2d`: patch_lite's blocks at `widths`, on 2 x 2-folded patches."""
    preset = copy.deepcopy(U.PRESETS["patch_lite"])
    preset.update(block_out_channels=widths, space_to_depth=2)
    installed = "patch_s2d" in U.PRESETS
    U.PRESETS["patch_s2d"] = preset                     # a second call only changes the widths
    if installed:
        return
    original_build, original_init = R.build_unet, R.HeatmapRegressor.__init__

    def build_unet(cfg, image_size=None):
        if cfg.preset != "patch_s2d":
            return original_build(cfg, image_size)
        kwargs = copy.deepcopy(U.PRESETS["patch_s2d"])
        kwargs.pop("resolution"), kwargs.pop("space_to_depth")
        # 1 input channel for HeatmapRegressor's checks; init() swaps in the 4-channel conv_in.
        return U.UNet2DModel(sample_size=image_size // 2, in_channels=1, out_channels=1, **kwargs)

    def init(self, unet, cfg, num_landmarks, *args, **kwargs):
        original_init(self, unet, cfg, num_landmarks, *args, **kwargs)
        if cfg.preset != "patch_s2d":                      # saved with the run: load() too
            return
        c = self.unet.config
        self.unet.conv_in = nn.Conv2d(4, c.block_out_channels[0], kernel_size=3, padding=1)
        self.unet.conv_out = R.make_head(cfg.head, c.block_out_channels[0], 4 * num_landmarks,
                                         c.norm_num_groups)
        forward = self.unet.forward

        def folded(x, t, class_labels=None):
            y = forward(F.pixel_unshuffle(x, 2), t, class_labels=class_labels).sample
            return types.SimpleNamespace(sample=F.pixel_shuffle(y, 2))
        self.unet.forward = folded

    R.build_unet, R.HeatmapRegressor.__init__ = build_unet, init
    R.check_unet_size = lambda unet, image_size: None      # sample_size is half the patch


if __name__ == "__main__":
    config, name, widths, *overrides = sys.argv[1:]
    install(tuple(int(w) for w in widths.split(",")))
    out = "runs/variants64"
    rc = main(["finetune", config, f"run.output_dir={out}", f"run.name={name}", "logger.kind=none",
               "model.init=scratch", "model.pretrained_path=", "model.preset=patch_s2d",
               *overrides])
    if rc == 0:
        rc = main(["evaluate", f"{out}/{name}", "--split", "test1"])
    sys.exit(rc)
