"""Run folders: every command that produces results writes them, with its resolved config, here."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ddpm_landmarks.config import save_config


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


def prepare_run_dir(cfg) -> Path:
    """Create run.output_dir/run.name and write the resolved config into it."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    return run_dir
