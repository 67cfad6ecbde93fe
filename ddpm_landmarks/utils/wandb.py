"""The W&B client's mode, one rule for training, evaluation and reports: online only when an
API key is available (WANDB_API_KEY, or a netrc entry for the W&B host), otherwise offline, a
complete local run that `wandb sync` uploads later. A cluster node without internet or
credentials therefore never blocks or fails on login.
"""
from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

_WANDB_HOST = "api.wandb.ai"


def wandb_api_key_available() -> bool:
    """True when W&B could log in without asking: WANDB_API_KEY, or netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname or _WANDB_HOST
    netrc_path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> 'online' with an API key, else 'offline'; other modes unchanged."""
    if mode == "auto":
        return "online" if wandb_api_key_available() else "offline"
    return mode


def csv_table(wandb, path: Path):
    """A wandb.Table of a CSV file (first row = columns)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return wandb.Table(columns=rows[0], data=rows[1:])
