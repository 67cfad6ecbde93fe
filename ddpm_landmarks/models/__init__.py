"""Networks and their saved form: the DDPM U-Net presets, the heatmap regressors (DDPM U-Net,
smp U-Net / U-Net++) and their registry, encoder weight files, the image classifier, the mean
shape, and `artifacts`: which saved thing a folder is and its metadata."""
