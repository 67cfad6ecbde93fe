"""The short version of the fault-injection suite (`make faults` runs the full one): real
training processes killed with SIGKILL - also in the middle of a checkpoint write - and resumed
end bit-identical to an uninterrupted run; a NaN step is skipped; a second grid runner is
refused and SIGTERM to a runner stops its job (experiments/faults/run_faults.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("run_faults",
                                               ROOT / "experiments" / "faults" / "run_faults.py")
run_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_faults)


def test_killed_resumed_nan_and_doubled_runs(tmp_path):
    results = run_faults.run_suite(trials=2, only=["kill_finetune", "nan_once", "two_grids"],
                                   seed=1, work=tmp_path)
    table = run_faults.table(results)
    for name, r in results.items():
        assert r["trials"] >= 1 and r["survived"] == r["trials"], f"{name}\n{table}"
    assert results["kill_finetune"]["max_diff"] == 0.0, table
