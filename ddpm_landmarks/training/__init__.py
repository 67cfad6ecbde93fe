"""Training: the one engine (accelerate, EMA, checkpoints, resume), optimisers, trackers, the
shared launch preamble of the entry scripts, validation and the pretraining landmark probe.
The entry scripts ddpm_landmarks/{pretrain,finetune,classify}.py belong to this layer."""
