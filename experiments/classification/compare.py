"""Compare pretrained checkpoints on an image classification task: one `classify` run and one
`evaluate-classifier` per checkpoint (each in its own process), then a table.

    python experiments/classification/compare.py CONFIG --out runs/classification/cobb \
        [--exports 'runs/grids/*/pretrain/*/export'] [--scratch] [--probe] [overrides...]

Every export found by the glob is classified by its kind: a DDPM export (config.json) runs as
`model.arch=ddpm_unet`, an SSL export (encoder.json) as `model.arch=smp` with its encoder name
and `gray_adapter=in_channels` for a 1-channel export (repeat for 3). `--scratch` adds the two
random-init baselines with the architectures of those exports (the DDPM U-Net preset of the
first DDPM export, the encoder of the first SSL export). `--probe` adds a frozen-encoder
(linear probe) run of every row next to its full fine-tuning. The dotted overrides apply
to every run (e.g. data.image_size=64 train.max_steps=400).

Writes OUT/<row>/ (the runs), OUT/results.csv and OUT/results.md (accuracy, balanced accuracy,
macro AUC on data.eval_split of the best/ model with 95% bootstrap intervals over the test
images, wall time of training and evaluation).
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def describe_export(export: Path) -> tuple[str, list[str], dict]:
    """(kind, classifier overrides, pretraining facts) of a DDPM or SSL export folder."""
    from ddpm_landmarks.methods.ddpm import CONFIG_NAME as DDPM_CONFIG
    names = [n for n in ("config.yaml", DDPM_CONFIG) if (export / n).is_file()]
    config = yaml.safe_load((export / names[0]).read_text()) if names else {}
    if (export / "encoder.json").is_file():
        meta = json.loads((export / "encoder.json").read_text())
        adapter = "in_channels" if meta["in_channels"] == 1 else "repeat"
        return meta.get("method", "ssl"), [
            "model.arch=smp", "model.init=pretrained", f"model.pretrained_path={export}",
            f"model.encoder={meta['encoder']}", f"model.gray_adapter={adapter}"], \
            {"encoder": meta["encoder"], "in_channels": meta["in_channels"], **_facts(config)}
    if (export / "config.json").is_file():
        preset = (config.get("model") or {}).get("preset", "?")
        return "ddpm", ["model.arch=ddpm_unet", "model.init=pretrained",
                        f"model.pretrained_path={export}"], {"preset": preset, **_facts(config)}
    raise SystemExit(f"error: {export} is neither a DDPM nor an SSL export")


def _facts(config: dict) -> dict:
    train = config.get("train") or {}
    return {"pretrain_steps": train.get("max_steps"), "pretrain_batch": train.get("batch_size")}


def bootstrap_ci(predictions: Path, draws: int = 2000, seed: int = 0) -> dict:
    """95% percentile-bootstrap intervals of accuracy and macro AUC over the test images (the
    test set is small: the spread of a single split matters when rows are compared)."""
    import numpy as np

    from ddpm_landmarks.evaluation.classification_metrics import classification_summary
    with open(predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    y = np.array([classes.index(r["true"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    rng = np.random.default_rng(seed)
    acc, auc = [], []
    for _ in range(draws):
        pick = rng.integers(0, len(rows), len(rows))
        s = classification_summary(y[pick], p[pick], classes)
        acc.append(s["accuracy"])
        if s["macro_auc"] is not None:
            auc.append(s["macro_auc"])
    return {"accuracy_ci": [float(v) for v in np.percentile(acc, [2.5, 97.5])],
            "auc_ci": [float(v) for v in np.percentile(auc, [2.5, 97.5])]}


def run(cmd: list[str], log: Path) -> float:
    """Run a command, its output into `log`; returns the wall time; exits on failure."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {code}; see {log}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--exports", default="runs/grids/*/pretrain/*/export")
    parser.add_argument("--scratch", action="store_true")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--split", default=None, help="evaluation split (default eval_split)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[tuple[str, list[str], dict]] = []
    for path in sorted(glob.glob(args.exports)):
        kind, overrides, facts = describe_export(Path(path))
        rows.append((f"{kind}:{Path(path).parent.name}", overrides, {"init": kind,
                                                                    "export": path, **facts}))
    if args.scratch:
        ddpm = next((f for _, _, f in rows if f["init"] == "ddpm"), None)
        ssl = next((f for _, _, f in rows if "encoder" in f), None)
        rows.append(("scratch:ddpm_unet", ["model.arch=ddpm_unet", "model.init=scratch",
                                           "model.pretrained_path=''",
                                           f"model.preset={ddpm['preset'] if ddpm else 'tiny'}"],
                     {"init": "scratch", "export": "-"}))
        encoder = ssl["encoder"] if ssl else "resnet18"
        rows.append((f"scratch:{encoder}", ["model.arch=smp", "model.init=scratch",
                                            "model.pretrained_path=''", f"model.encoder={encoder}",
                                            "model.gray_adapter=in_channels"],
                     {"init": "scratch", "export": "-"}))
    modes = [("finetune", [])] + ([("probe", ["model.freeze=encoder"])] if args.probe else [])

    results = []
    for name, overrides, facts in rows:
        for mode, extra in modes:
            tag = f"{name.replace(':', '-')}-{mode}"
            run_overrides = [*args.overrides, *overrides, *extra, f"run.output_dir={out}",
                             f"run.name={tag}"]
            train_s = run([sys.executable, "-m", "ddpm_landmarks.cli.main", "classify",
                           args.config, *run_overrides], out / f"{tag}.train.log")
            eval_cmd = [sys.executable, "-m", "ddpm_landmarks.cli.main", "evaluate-classifier",
                        str(out / tag)] + (["--split", args.split] if args.split else [])
            eval_s = run(eval_cmd, out / f"{tag}.eval.log")
            split = args.split or yaml.safe_load((out / tag / "config.yaml").read_text())[
                "data"]["eval_split"]
            metrics = json.loads((out / tag / f"eval_{split}" / "metrics.json").read_text())
            ci = bootstrap_ci(out / tag / f"eval_{split}" / "predictions.csv")
            results.append({"row": name, "mode": mode, **facts, "split": split,
                            "n": metrics["n"], "accuracy": metrics["accuracy"],
                            "balanced_accuracy": metrics["balanced_accuracy"],
                            "macro_auc": metrics["macro_auc"], **ci,
                            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
                            "weights": Path(metrics["weights"]).name})
            print(f"{tag}: accuracy {metrics['accuracy']:.3f} AUC {metrics['macro_auc']:.3f} "
                  f"({train_s:.0f} s + {eval_s:.0f} s)", flush=True)

    keys = list(dict.fromkeys(k for r in results for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    (out / "results.csv").write_text(buf.getvalue())
    lines = ["| encoder | training | accuracy [95% CI] | balanced accuracy | macro AUC [95% CI] "
             "| n | train s | eval s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, u = r["accuracy_ci"], r["auc_ci"]
        lines.append(f"| {r['row']} | {'linear probe' if r['mode'] == 'probe' else 'full'} | "
                     f"{100 * r['accuracy']:.1f}% [{100 * a[0]:.0f}-{100 * a[1]:.0f}] | "
                     f"{100 * r['balanced_accuracy']:.1f}% | {r['macro_auc']:.3f} "
                     f"[{u[0]:.2f}-{u[1]:.2f}] | {r['n']} | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
