"""What a training step is, one file per method (DDPM, SimCLR, MoCo v2 / v3, heatmap
regression, classification), each giving the engine a network, a loss, image logs and an
export; the pretraining methods are in `registry`."""
