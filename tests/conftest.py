"""Shared fixtures. Real data is found through DDPM_LANDMARKS_DATA (default ../shared/data)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    return Path(os.environ.get("DDPM_LANDMARKS_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set DDPM_LANDMARKS_DATA to the data folder)")
    return path


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for the module: on a 2-core machine two OpenMP threads spin against
    DataLoader workers and other jobs (4x slower when busy); one thread is steadier."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Every test starts and ends with fresh Accelerate singletons: tests build several
    Accelerators (precisions, process counts) in one process."""
    from ddpm_landmarks.training.engine import reset_accelerate_state
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers, one per core) each worker keeps to one
    intra-op thread: two workers of two OpenMP threads each on two cores spin against each
    other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)
