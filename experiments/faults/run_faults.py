"""The fault-injection suite: what a killed, poisoned or doubled training run leaves behind.

    make faults                                    # python experiments/faults/run_faults.py
    python experiments/faults/run_faults.py --trials 3 --only kill_finetune   # a quick look

Scenarios (each a real `python -m ddpm_landmarks.<script>` process on the built-in synthetic
data, a tiny U-Net on a 32 px grid, fp32 on the CPU):
  kill_pretrain / kill_finetune  SIGKILL at `trials` random moments - a random delay after
                                 the start, or in the middle of a checkpoint write (the n-th
                                 file of a save, experiments/faults/faulty_launch.py) - each
                                 time resumed with train.resume=latest, until the run ends.
                                 Survived: the final export (and fine-tuning's best/) is
                                 bit-identical to an uninterrupted run's.
  nan_once                       the loss is NaN on one micro-batch: that step is skipped
                                 (train/nonfinite_skipped = 1) and the run ends with finite
                                 weights.
  nan_forever                    NaN from the 3rd batch on: the run stops with an error naming the
                                 step; its newest checkpoint holds finite weights.
  bad_inputs                     the battery of experiments/faults/bad_inputs.py: every bad
                                 input refused before the run started.
  two_runners / two_grids        a second training into a folder another one holds, a second
                                 runner on a grid another one runs: refused.
The table: scenario | trials | survived | max weight difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "experiments" / "faults" / "faulty_launch.py"

SYNTH = ["data.synthetic_num_images=40", "data.synthetic_image_size=64",
         "data.synthetic_num_landmarks=4", "data.image_size=32"]
PRETRAIN = ["model.preset=tiny", "train.max_steps=24", "train.batch_size=4",
            "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.num_workers=0",
            "train.image_every=0", "train.log_every=3", "optim.warmup_steps=4",
            "logger.kind=none"]
FINETUNE = ["model.init=scratch", "model.pretrained_path=", "model.preset=tiny",
            "fewshot.budget=8", "fewshot.val_count=4", "train.max_steps=24",
            "train.batch_size=4", "train.checkpoint_every=3", "train.keep_checkpoints=2",
            "train.eval_every=4", "train.num_workers=0", "train.log_every=3",
            "train.early_stopping_patience=0", "optim.warmup_steps=4", "logger.kind=none"]
SCRIPTS = {"pretrain": ("ddpm_landmarks.pretrain", "configs/pretrain/synthetic.yaml", PRETRAIN),
           "finetune": ("ddpm_landmarks.finetune", "configs/finetune/synthetic.yaml", FINETUNE)}


def command(script: str, data_root: Path, out: Path, name: str, extra=()) -> list[str]:
    module, config, overrides = SCRIPTS[script]
    return [sys.executable, str(LAUNCH), module, "--config", str(ROOT / config),
            f"data.root={data_root}", *SYNTH, *overrides, f"run.output_dir={out}",
            f"run.name={name}", *extra]


def env(**faults) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    return {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in faults.items()}}


def run(argv: list[str], **faults) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env(**faults), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return out


def max_difference(a: Path, b: Path) -> float:
    """inf when the folders do not hold the same tensors."""
    ta, tb = tensors(a), tensors(b)
    if not ta or ta.keys() != tb.keys():
        return float("inf")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0
               for k in ta)


# ----------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------

def kill_and_resume(script: str, data_root: Path, work: Path, trials: int, seed: int) -> dict:
    """Runs killed at random moments and resumed until they end, against an uninterrupted run
    (module doc). A run that ends before it was killed often enough is followed by another
    (a new folder), until `trials` kills; every run's export is compared."""
    rng = random.Random(seed)
    reference = run(command(script, data_root, work, "reference"))
    if reference.returncode != 0:
        raise RuntimeError(f"reference {script} failed:\n{reference.stderr[-3000:]}")
    started = time.perf_counter()
    subprocess.run(command(script, data_root, work, "probe_time") + ["train.max_steps=1"],
                   env=env(), cwd=ROOT, capture_output=True, timeout=900)
    startup = time.perf_counter() - started            # imports + data + one step
    kills, mid_save, launches, chains, survived, worst = 0, 0, 0, 0, 0, 0.0
    while kills < trials:
        chains += 1
        name = f"killed_{chains}"
        argv = command(script, data_root, work, name, ["train.resume=latest"])
        chain_kills = 0
        while not (work / name / "export").is_dir():
            launches += 1
            if kills >= trials:                        # enough: let it finish
                proc = run(argv)
            elif rng.random() < 0.5:
                # Mid-save: the n-th checkpoint file this process writes (about 9 per save).
                proc = run(argv, FAULT_KILL_AT_WRITE=rng.randint(1, 27))
                mid_save += proc.returncode == -signal.SIGKILL
            else:
                live = subprocess.Popen(argv, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
                try:
                    live.wait(timeout=rng.uniform(0.5 * startup, 2.0 * startup))
                except subprocess.TimeoutExpired:
                    live.send_signal(signal.SIGKILL)
                live.wait()
                proc = subprocess.CompletedProcess(argv, live.returncode, "", live.stderr.read())
            if proc.returncode == -signal.SIGKILL:
                kills, chain_kills = kills + 1, chain_kills + 1
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"{script} resume failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
        diff = max_difference(work / "reference" / "export", work / name / "export")
        if script == "finetune":
            diff = max(diff, max_difference(work / "reference" / "best", work / name / "best"))
        worst = max(worst, diff)
        survived += chain_kills if diff == 0.0 else 0
    return {"trials": kills, "survived": survived, "max_diff": worst,
            "detail": f"{mid_save} of the kills during a checkpoint write; {chains} runs, "
                      f"{launches} launches"}


def nan_once(data_root: Path, work: Path) -> dict:
    proc = run(command("finetune", data_root, work, "nan_once"), FAULT_NAN_FROM_BATCH=5,
               FAULT_NAN_BATCHES=1)
    if proc.returncode != 0:
        return {"trials": 1, "survived": 0, "max_diff": float("nan"),
                "detail": f"exit {proc.returncode}: {error_line(proc.stderr)[:120]}"}
    rows = [json.loads(r) for r in (work / "nan_once" / "metrics.jsonl").read_text().splitlines()]
    skipped = max(r.get("train/nonfinite_skipped", 0) for r in rows)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors(work / "nan_once" / "export").values())
    ok = skipped == 1 and finite
    return {"trials": 1, "survived": int(ok), "max_diff": float("nan"),
            "detail": f"nonfinite_skipped={skipped}, export finite={finite}"}


def error_line(text: str) -> str:
    """The `error: ...` line of a command's stderr (its last line when there is none)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("error:")),
                lines[-1] if lines else "(no output)")


def nan_forever(data_root: Path, work: Path) -> dict:
    proc = run(command("finetune", data_root, work, "nan_forever", ["train.checkpoint_every=2"]),
               FAULT_NAN_FROM_BATCH=3, FAULT_NAN_BATCHES=0)
    last = error_line(proc.stderr)
    checkpoints = sorted((work / "nan_forever" / "checkpoints").glob("step_*"))
    finite = bool(checkpoints) and all(
        bool(torch.isfinite(t).all()) for t in tensors(checkpoints[-1]).values()
        if t.is_floating_point())
    ok = proc.returncode != 0 and "in a row" in proc.stderr and finite
    return {"trials": 1, "survived": int(ok), "max_diff": float("nan"),
            "detail": f"exit {proc.returncode}; newest checkpoint {checkpoints[-1].name if checkpoints else '-'} "
                      f"finite={finite}; {last[:120]}"}


def two_runners(data_root: Path, work: Path) -> dict:
    argv = command("pretrain", data_root, work, "shared", ["train.max_steps=400"])
    first = subprocess.Popen(argv, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = work / "shared" / ".lock"
        deadline = time.time() + 300
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
            time.sleep(0.2)
        second = run(command("pretrain", data_root, work, "shared", ["train.resume=latest"]))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    ok = second.returncode == 2 and "another process" in second.stderr
    return {"trials": 1, "survived": int(ok), "max_diff": float("nan"),
            "detail": error_line(second.stderr)[:140]}


def two_grids(data_root: Path, work: Path) -> dict:
    grid = work / "grid.yaml"
    grid.write_text(json.dumps({
        "name": "faults", "output_dir": str(work / "grids"), "budgets": [8], "seeds": [0],
        "eval_split": "test1", "launcher": {"kind": "process"},
        "finetune_overrides": [f"data.root={data_root}", *SYNTH, *FINETUNE,
                               "train.max_steps=400"],
        "datasets": {"synthetic": {"finetune": str(ROOT / "configs/finetune/synthetic.yaml")}},
        "inits": {"scratch": {"overrides": ["model.preset=tiny"]}}}))
    cli = [sys.executable, "-m", "ddpm_landmarks.cli.main", "grid", str(grid)]
    first = subprocess.Popen(cli, env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    job_pid = None
    try:
        # Wait for the cell's training process: it holds its run folder's lock (its pid).
        deadline = time.time() + 300
        while time.time() < deadline and job_pid is None:
            for lock in (work / "grids" / "faults" / "cells").glob("*/.lock"):
                text = lock.read_text().strip()
                job_pid = int(text) if text.isdigit() else None
            time.sleep(0.2)
        second = run(cli)
    finally:
        first.send_signal(signal.SIGTERM)          # the runner forwards it to its job
        first.wait(timeout=300)
    alive = job_pid is not None and Path(f"/proc/{job_pid}").exists()
    ok = second.returncode == 2 and "another" in second.stderr and job_pid and not alive
    return {"trials": 1, "survived": int(bool(ok)), "max_diff": float("nan"),
            "detail": f"second runner: {error_line(second.stderr)[:100]}; the running job "
                      f"(pid {job_pid}) {'still alive: an orphan' if alive else 'ended'} after "
                      f"SIGTERM to the runner (exit {first.returncode})"}


def bad_inputs(data_root: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "experiments" / "faults"))
    try:
        from bad_inputs import battery_rows
    except ImportError:
        return {"trials": 0, "survived": 0, "max_diff": float("nan"),
                "detail": "experiments/faults/bad_inputs.py not found"}
    rows = battery_rows(work / "bad_inputs")
    refused = sum(1 for r in rows if r["refused_before_start"])
    return {"trials": len(rows), "survived": refused, "max_diff": float("nan"),
            "detail": f"{refused} of {len(rows)} refused before the run started",
            "rows": rows}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def scenarios(trials: int, seed: int) -> dict[str, Callable[[Path, Path], dict]]:
    return {
        "kill_pretrain": lambda d, w: kill_and_resume("pretrain", d, w, trials, seed),
        "kill_finetune": lambda d, w: kill_and_resume("finetune", d, w, trials, seed + 1),
        "nan_once": nan_once,
        "nan_forever": nan_forever,
        "bad_inputs": bad_inputs,
        "two_runners": two_runners,
        "two_grids": two_grids,
    }


def table(results: dict[str, dict]) -> str:
    lines = ["| scenario | trials | survived | max weight difference | detail |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        diff = r["max_diff"]
        shown = "-" if diff != diff else ("0 (bit-identical)" if diff == 0 else f"{diff:.3g}")
        lines.append(f"| {name} | {r['trials']} | {r['survived']} | {shown} | {r['detail']} |")
    return "\n".join(lines)


def run_suite(trials: int, only: Optional[list[str]] = None, seed: int = 0,
              work: Optional[Path] = None) -> dict[str, dict]:
    work = Path(work or tempfile.mkdtemp(prefix="ddpm-faults-"))
    data_root = work / "synthetic"
    results = {}
    for name, fn in scenarios(trials, seed).items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        results[name] = fn(data_root, folder)
        results[name]["wall_s"] = time.perf_counter() - t0
        print(f"[faults] {name}: {results[name]['survived']}/{results[name]['trials']} "
              f"({results[name]['wall_s']:.0f} s) {results[name]['detail']}", flush=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kills per kill scenario")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = run_suite(args.trials, [s for s in args.only.split(",") if s] or None, args.seed)
    text = table(results)
    print(text)
    if "bad_inputs" in results and results["bad_inputs"].get("rows"):
        print("\nbad inputs:\n| kind | error | refused before the run started |\n|---|---|---|")
        for r in results["bad_inputs"]["rows"]:
            print(f"| {r['kind']} | {r['error'][:110]} | {'yes' if r['refused_before_start'] else 'NO'} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = all(r["survived"] == r["trials"] and r["trials"] > 0 for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
