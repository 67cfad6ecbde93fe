"""Helpers every layer may use: atomic files and folders, data paths, logging set-up, the W&B
client mode, unwrapping DDP / compile wrappers. No project imports above `errors`."""
