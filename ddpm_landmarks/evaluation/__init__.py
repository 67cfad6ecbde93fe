"""Scoring in the field's units: radial errors in mm (per-image (x, y) spacing) or pixels,
MRE / SDR summaries, result files, overlays, W&B evaluation logging, classification metrics and
the mean-shape baseline."""
