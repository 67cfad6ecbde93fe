"""The heatmap representation of landmarks, in one place: targets (Gaussian / disc), losses,
network outputs -> heatmaps, and decoders (heatmaps -> sub-pixel points). It depends on nothing
but the configs: which images the points come from is data/'s business."""
