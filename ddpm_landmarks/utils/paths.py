"""Paths written in configs: `~` and `$VARS` expanded, with the data folder variable defaulted."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "DDPM_LANDMARKS_DATA"
DEFAULT_DATA_DIR = "data"


def data_dir() -> Path:
    """The folder holding the real datasets: $DDPM_LANDMARKS_DATA, default ./data."""
    return Path(os.path.expanduser(os.environ.get(DATA_ENV, DEFAULT_DATA_DIR)))


def expand_path(text: str) -> Path:
    """Expand ~ and environment variables; ${DDPM_LANDMARKS_DATA} works even when unset."""
    env = dict(os.environ)
    env.setdefault(DATA_ENV, DEFAULT_DATA_DIR)
    expanded = os.path.expanduser(text)
    for name in (DATA_ENV,):
        expanded = expanded.replace(f"${{{name}}}", env[name]).replace(f"${name}", env[name])
    return Path(os.path.expandvars(expanded))
