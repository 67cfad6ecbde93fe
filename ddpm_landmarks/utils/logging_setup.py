"""Logging of a command: to stderr and, for a run, to its run folder's log.txt."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when a run folder is given, to run_dir/log.txt as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # accelerate logs every file of every checkpoint at INFO: keep the run log readable.
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
