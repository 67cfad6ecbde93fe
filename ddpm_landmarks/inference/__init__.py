"""Using trained models: loading a run folder, the predictor (model -> heatmaps -> points in
original pixels), `evaluate` of a run on a labelled split, `predict` on new images, and
classifier runs."""
