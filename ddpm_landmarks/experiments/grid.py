"""Run an experiment grid: every cell (fine-tune + evaluate), one after another, each after the
shared jobs it starts from (pretrainings, source fine-tunings), surviving interruptions.

    ddpm-landmarks grid experiments/cpu-small.yaml [--dry-run] [--only PATTERN] [overrides]

Layout of <output_dir>/<name>/:
    grid.json                    the plan: resolved grid, every job's config file and overrides
    pretrain/<init>-<hash>/      a pretraining run (+ pretraining.json: status)
    sources/<init>-<hash>/       a supervised source fine-tuning (+ source.json: status)
    cells/<dataset>-<init>-N<budget>-s<seed>-<hash>/
                                 a fine-tuning run, its eval_<split>/ and cell.json (status,
                                 command, config hash, wall time, metrics, or the error of a
                                 failed cell); <hash> is that of the cell's resolved config, so
                                 an edited experiment file re-runs exactly the cells it changes
        refine-<hash>/           with a refinement stage: the cell's refinement run, scored
                                 with both stages (cell.json: metrics = final, stage1_metrics)
    job_logs/<job>.log           stdout + stderr of each job run as a process
    report/                      `ddpm-landmarks report` output, refreshed at the end

Restart = run the same command again: finished shared jobs (pretrainings, source
fine-tunings: shared_jobs.py) and cells (status "done") are skipped; an interrupted one resumes
from its last checkpoint (every job runs with train.resume=latest); failed ones are tried
again. A failing job is recorded with its error and the grid carries on with the cells that do
not depend on it. One runner per grid folder (a lock). Each job process runs in its own process
group; SIGINT / SIGTERM to the runner are forwarded to it, the runner waits for it to end and
then stops (GridInterrupted): no job outlives its runner, and a new runner resumes it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.experiments.grid_plan import (
    Cell,
    Plan,
    budget_label,
    build_plan,
    check_plan_inputs,
    plan_summary,
)
from ddpm_landmarks.experiments.grid_schema import GridConfig
from ddpm_landmarks.experiments.shared_jobs import Pretraining, SourceJob
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

CELL_STATUS = "cell.json"
PRETRAIN_STATUS = Pretraining.status_file
SOURCE_STATUS = SourceJob.status_file


class JobFailed(RuntimeError):
    """A pretraining, fine-tuning or evaluation job that did not finish."""


class GridInterrupted(RuntimeError):
    """The runner got SIGINT / SIGTERM; the running job was stopped and waited for."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}: the running job was stopped "
                         f"and waited for; run the same command again to resume")
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Status files
# ----------------------------------------------------------------------------------------------

def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(path: Path, status: dict) -> None:
    atomic_write_text(path, json.dumps(status, indent=2, default=str) + "\n")


@contextmanager
def grid_lock(grid_dir: Path) -> Iterator[None]:
    """One runner per grid folder; the lock dies with its process (a killed runner frees it)."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    with open(grid_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `ddpm-landmarks grid` is running in {grid_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Launching one job
# ----------------------------------------------------------------------------------------------

def _module_command(grid: GridConfig, module: str, config: str, overrides: list[str],
                    distributed: bool) -> list[str]:
    launcher = grid.launcher
    if distributed and launcher.kind == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch",
                "--num_processes", str(launcher.num_processes), *launcher.accelerate_args,
                "-m", module, "--config", config, *overrides]
    return [sys.executable, "-m", module, "--config", config, *overrides]


def _evaluate_command(run_dir: Path, split: str) -> list[str]:
    return [sys.executable, "-m", "ddpm_landmarks.cli.main", "evaluate", str(run_dir),
            "--split", split]


def _error_of_log(text: str) -> str:
    """The line that says what went wrong: our `error: ...` line, else the exception line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~")) and ("Error" in line or "Exception" in line):
            return line
    return lines[-1] if lines else "(no output)"


def _run_process(argv: list[str], log_path: Path) -> None:
    """Run one job in its own process group; SIGINT / SIGTERM to the runner go to the whole
    group (accelerate's children included), and the runner waits for it before it stops."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    with open(log_path, "a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)

        def forward(signum, frame) -> None:
            received.append(signum)
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        raise GridInterrupted(received[0])
    if rc != 0:
        tail = log_path.read_text()[-20000:]
        raise JobFailed(f"{_error_of_log(tail)} (exit status {rc}; log: {log_path})")


def _inline(fn: Callable[[], object]) -> None:
    from ddpm_landmarks.training.engine import reset_accelerate_state
    reset_accelerate_state()
    try:
        fn()
    except Exception as err:           # noqa: BLE001 - a cell's failure is recorded, not fatal
        log.debug("inline job failed:\n%s", traceback.format_exc())
        raise JobFailed(f"{type(err).__name__}: {err}") from err


def run_shared_job(grid: GridConfig, job: Pretraining | SourceJob) -> None:
    """A pretraining or a source fine-tuning, by the grid's launcher."""
    if grid.launcher.kind == "inline":
        if isinstance(job, Pretraining):
            from ddpm_landmarks.pretrain import pretrain as run
        else:
            from ddpm_landmarks.finetune import finetune as run
        _inline(lambda: run(job.config))
        return
    prefix = "pretrain" if isinstance(job, Pretraining) else "source"
    _run_process(_module_command(grid, job.module, job.config_path, job.overrides,
                                 distributed=True),
                 grid.grid_dir / "job_logs" / f"{prefix}-{job.name}.log")


def run_finetuning(grid: GridConfig, cell: Cell) -> None:
    if grid.launcher.kind == "inline":
        from ddpm_landmarks.finetune import finetune
        _inline(lambda: finetune(cell.config))
        return
    _run_process(_module_command(grid, "ddpm_landmarks.finetune", cell.config_path,
                                 cell.overrides, distributed=True),
                 grid.grid_dir / "job_logs" / f"{cell.name}.log")


def run_refinement(grid: GridConfig, cell: Cell) -> None:
    """Stage 2 of a cell: its refinement run on the cell's stage-1 run."""
    if grid.launcher.kind == "inline":
        from ddpm_landmarks.finetune import finetune
        _inline(lambda: finetune(cell.refine.config))
        return
    _run_process(_module_command(grid, "ddpm_landmarks.finetune", cell.refine.config_path,
                                 cell.refine.overrides, distributed=True),
                 grid.grid_dir / "job_logs" / f"{cell.name}.log")


def scored_dir(cell: Cell) -> Path:
    """The run the cell is scored with: the refinement run (both stages) or stage 1."""
    return cell.refine.run_dir if cell.refine is not None else cell.run_dir


def run_evaluation(grid: GridConfig, cell: Cell) -> dict:
    """Evaluate the cell's best model (both stages with a refinement) on cell.eval_split;
    returns its metrics.json."""
    run_dir = scored_dir(cell)
    if grid.launcher.kind == "inline":
        def evaluate() -> None:
            from ddpm_landmarks.evaluation.wandb_log import log_evaluation
            from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
            run = load_trained_run(run_dir)
            summary = evaluate_run(run, cell.eval_split)
            log_evaluation(run.cfg.logger, run.run_dir,
                           f"{cell.name}-eval-{cell.eval_split}", summary, summary["out_dir"])
        _inline(evaluate)
    else:
        # One process is plenty for inference, whatever the training launcher.
        _run_process(_evaluate_command(run_dir, cell.eval_split),
                     grid.grid_dir / "job_logs" / f"{cell.name}.log")
    return json.loads((run_dir / f"eval_{cell.eval_split}" / "metrics.json").read_text())


def run_mean_shape_cell(grid: GridConfig, cell: Cell) -> dict:
    """The trivial predictor on the cell's few-shot draw (seconds: always in this process)."""
    from ddpm_landmarks.config.schema import save_config
    from ddpm_landmarks.evaluation.mean_shape import run_mean_shape
    save_config(cell.config, cell.run_dir / "config.yaml")
    _inline(lambda: run_mean_shape(cell.config, cell.run_dir, cell.eval_split))
    return json.loads((cell.run_dir / f"eval_{cell.eval_split}" / "metrics.json").read_text())


def job_command(grid: GridConfig, module: str, config: str, overrides: list[str]) -> str:
    """The shell command that runs a job by hand (recorded in its status file)."""
    import shlex
    return shlex.join(_module_command(grid, module, config, overrides, distributed=True))


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

def _ensure_job(grid: GridConfig, job: Pretraining | SourceJob) -> None:
    """Run (or resume) a shared job unless it is done, after the jobs it starts from; JobFailed
    if it or one of those fails (tried once per grid run, however many cells need it)."""
    for dependency in job.dependencies:
        _ensure_job(grid, dependency)
    status_path = job.run_dir / job.status_file
    status = read_status(status_path)
    if status.get("status") == "done" and job.export_dir.is_dir():
        return
    if status.get("status") == "failed" and status.get("attempt_of_this_run"):
        raise JobFailed(f"{job.label} {job.name} failed: {status.get('error')}")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {"name": job.name, **job.status_fields(), "users": job.users,
              "command": job_command(grid, job.module, job.config_path, job.overrides),
              "started": started}
    write_status(status_path, {**record, "status": "running"})
    fields = ", ".join(f"{k} {v}" for k, v in job.status_fields().items())
    print(f"[grid] {job.label} {job.name} ({fields}; for {len(job.users)} jobs) ...", flush=True)
    try:
        run_shared_job(grid, job)
        if not job.export_dir.is_dir():
            raise JobFailed(f"finished without writing {job.export_dir}")
    except JobFailed as err:
        write_status(status_path, {**record, "status": "failed", "error": str(err),
                                   "wall_s": time.time() - started, "attempt_of_this_run": True})
        print(f"[grid] {job.label} {job.name} FAILED: {err}", flush=True)
        raise JobFailed(f"{job.label} {job.name} failed: {err}") from None
    wall = time.time() - started
    write_status(status_path, {**record, "status": "done", "wall_s": wall,
                               "finished": time.time(), **job.result()})
    print(f"[grid] {job.label} {job.name} done in {wall:.0f} s", flush=True)


def _metrics_record(metrics: dict) -> dict:
    keep = ("unit", "mre", "sd", "median", "sdr", "n", "missed", "thresholds", "images")
    return {k: metrics[k] for k in keep if k in metrics}


def run_cell(grid: GridConfig, cell: Cell, index: int, total: int) -> dict:
    """Pretraining (if needed), fine-tuning and evaluation of one cell; its final status."""
    status_path = cell.run_dir / CELL_STATUS
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {**cell.key, "budget_label": budget_label(cell.budget), "name": cell.name,
              "kind": cell.kind, "eval_split": cell.eval_split, "config_hash": cell.config_hash,
              "run_dir": str(cell.run_dir),
              "pretraining": cell.pretraining.name if cell.pretraining else None,
              "source": cell.source.name if cell.source else None,
              "command": "mean-shape predictor, run in the grid's process"
              if cell.kind == "mean_shape" else
              job_command(grid, "ddpm_landmarks.finetune", cell.config_path, cell.overrides),
              "started": started}
    write_status(status_path, {**record, "status": "running"})
    label = f"[grid {index}/{total}] {cell.name}"
    print(f"{label} ...", flush=True)
    try:
        if cell.kind == "mean_shape":
            metrics = run_mean_shape_cell(grid, cell)
        else:
            for job in cell.dependencies:
                _ensure_job(grid, job)
            run_finetuning(grid, cell)
            if cell.refine is not None:
                run_refinement(grid, cell)
            metrics = run_evaluation(grid, cell)
    except JobFailed as err:
        status = {**record, "status": "failed", "error": str(err),
                  "wall_s": time.time() - started}
        write_status(status_path, status)
        print(f"{label}: FAILED: {err}", flush=True)
        return status
    split = read_status(cell.run_dir / "split.json")
    status = {**record, "status": "done", "wall_s": time.time() - started,
              "finished": time.time(), "metrics": _metrics_record(metrics),
              "train_images": split.get("num_train", cell.budget),
              "eval_dir": str(scored_dir(cell) / f"eval_{cell.eval_split}")}
    if cell.refine is not None:
        status.update(stage1_metrics=_metrics_record(metrics.get("stage1", {})),
                      refine_run_dir=str(cell.refine.run_dir), refine_hash=cell.refine.key)
    write_status(status_path, status)
    mre = metrics.get("mre")          # null when every landmark was missed
    print(f"{label}: done in {status['wall_s']:.0f} s, " + (
        f"MRE {mre:.3f} {metrics['unit']}" if mre is not None else
        f"no landmark found ({metrics.get('missed')} missed)"), flush=True)
    return status


def is_done(cell: Cell) -> bool:
    """Done before, with the stage 2 the plan asks for (a new or changed refinement runs
    again: stage 1 resumes as finished, the refinement trains)."""
    status = read_status(cell.run_dir / CELL_STATUS)
    wanted = cell.refine.key if cell.refine is not None else None
    return status.get("status") == "done" and status.get("refine_hash") == wanted


def select_cells(plan: Plan, only: Optional[str]) -> list[Cell]:
    """Cells whose name contains every comma-separated part of `only` (None = all)."""
    if not only:
        return plan.cells
    parts = [p for p in only.split(",") if p]
    chosen = [c for c in plan.cells if all(p in c.name for p in parts)]
    if not chosen:
        raise ConfigError(f"--only {only!r} matches no cell; cells: "
                          f"{', '.join(c.name for c in plan.cells)}")
    return chosen


def run_grid(grid: GridConfig, only: Optional[str] = None, report: bool = True) -> dict:
    """Run every cell not yet done; returns {"done": [...], "failed": [...], "skipped": [...]}."""
    plan = build_plan(grid)
    cells = select_cells(plan, only)
    check_plan_inputs(plan)
    grid_dir = grid.grid_dir
    outcome: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    with grid_lock(grid_dir):
        write_status(grid_dir / "grid.json", {**plan_summary(plan), "started": time.time()})
        # A shared job that failed earlier is tried again once in this run, not once per cell.
        for job in plan.pretrainings + plan.sources:
            status = read_status(job.run_dir / job.status_file)
            if status.get("attempt_of_this_run"):
                write_status(job.run_dir / job.status_file,
                             {**status, "attempt_of_this_run": False})
        t0 = time.time()
        for i, cell in enumerate(cells, 1):
            if is_done(cell):
                outcome["skipped"].append(cell.name)
                print(f"[grid {i}/{len(cells)}] {cell.name}: done before, skipped", flush=True)
                continue
            status = run_cell(grid, cell, i, len(cells))
            outcome["done" if status["status"] == "done" else "failed"].append(cell.name)
        print(f"[grid] {grid.name}: {len(outcome['done'])} run, {len(outcome['skipped'])} "
              f"skipped, {len(outcome['failed'])} failed in {time.time() - t0:.0f} s; "
              f"folder {grid_dir}", flush=True)
        if report:
            from ddpm_landmarks.experiments.report import write_report
            write_report(grid_dir, wandb=grid.logger.kind == "wandb")
    return outcome
