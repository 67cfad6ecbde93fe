"""One model's ISBI Test1 predictions scored in our convention and in the released code's
(`ddpm-landmarks evaluate --convention released`, evaluation/released_convention.py): how much
the scoring alone moves the numbers.

    python experiments/released_convention.py --out runs/released_convention [overrides...]

Fine-tunes a small CPU model (configs/finetune/isbi2015.yaml at 64 px, 50 labels, the tiny
U-Net from scratch, 300 steps; the overrides change it), evaluates its best/ model on Test1
both ways (two folders of the run, the same predictions) and writes OUT/table.md: MRE, SD,
median and SDR at the released radii, each way, and the difference (released - ours), with
the commands and the wall times. Needs $DDPM_LANDMARKS_DATA/isbi2015.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RADII = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)
TRAIN = ["data.image_size=64", "heatmap.sigma=2.0", "model.init=scratch", "model.pretrained_path=",
         "model.preset=tiny", "train.max_steps=300", "train.batch_size=8",
         "train.mixed_precision=no", "train.eval_every=50", "train.early_stopping_patience=0",
         "train.checkpoint_every=1000", "train.num_workers=0", "train.image_every=0",
         "optim.lr=0.001", "optim.head_lr=0.001", "optim.warmup_steps=20", "logger.kind=none",
         f"eval.sdr_thresholds=[{', '.join(map(str, RADII))}]"]


def run(cmd: list[str]) -> float:
    """Run a command (errors end the script); its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def row(name: str, metrics: dict) -> list:
    return [name, metrics["mre"], metrics["sd"], metrics["median"]] + \
        [metrics["sdr"][str(r)] for r in RADII] + [metrics["missed"]]


def table(ours: dict, released: dict) -> str:
    head = ["scoring", "MRE", "SD", "median"] + [f"SDR {r:g}" for r in RADII] + ["missed"]
    a, b = row("ours (original pixels, mm)", ours), row("released (256 grid, their rules)", released)
    diff = ["released - ours"] + [y - x for x, y in zip(a[1:], b[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (a, b, diff):
        cells = [r[0]] + [f"{v:+.3f}" if r is diff and i < 3 else f"{v:+.2f}" if r is diff
                          else f"{v:.3f}" if i < 3 else f"{v:.2f}" for i, v in enumerate(r[1:-1])]
        lines.append("| " + " | ".join(cells + [f"{r[-1]:+d}" if r is diff else str(r[-1])])
                     + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/released_convention")
    parser.add_argument("overrides", nargs="*", help="more fine-tuning overrides")
    args = parser.parse_args()
    out = Path(args.out)
    cli = [sys.executable, "-m", "ddpm_landmarks.cli.main"]
    train = cli + ["finetune", "configs/finetune/isbi2015.yaml", *TRAIN, *args.overrides,
                   f"run.output_dir={out}", "run.name=model"]
    t_train = run(train)
    evaluate = cli + ["evaluate", str(out / "model"), "--split", "test1", "--device", "cpu"]
    t_ours = run(evaluate)
    t_released = run(evaluate + ["--convention", "released"])
    ours = json.loads((out / "model" / "eval_test1" / "metrics.json").read_text())
    released = json.loads((out / "model" / "eval_test1_released" / "metrics.json").read_text())
    text = "\n".join([
        "# One model's ISBI Test1 predictions, scored both ways", "",
        "```bash", " ".join(train[2:]), " ".join(evaluate[2:]),
        " ".join(evaluate[2:] + ["--convention", "released"]), "```", "",
        f"Fine-tuning {t_train / 60:.1f} min, evaluation {t_ours:.0f} s (ours) and "
        f"{t_released:.0f} s (released) on this machine. The same {ours['n']} predicted points "
        f"(150 images x 19 landmarks); errors in mm.", "",
        table(ours, released), ""])
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
