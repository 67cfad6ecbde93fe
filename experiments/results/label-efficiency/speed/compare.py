"""Cheaper refinements against the `patch_lite` one (grid 512, 32 px patches, 2000 steps: the
default until `patch_fold` replaced it; runs/variants64/steps2000-<init>-s<k>), on the same
64 px stage-1 runs (N = 50, seeds 0-2), paired per Test1 image. Chosen on validation (each run's 10 validation images with its
per-landmark choice, from refine.json); Test1 reported. Writes results.md.

    .venv/bin/python experiments/results/label-efficiency/speed/compare.py
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "resolution" / "variants"))
from compare import sdr2, summary, validation_mre  # noqa: E402  (sibling study's helpers)

from ddpm_landmarks.studies.paired_comparison import compare_pair, per_image_errors  # noqa: E402
from ddpm_landmarks.utils.atomic import atomic_write_text  # noqa: E402

RUNS = Path("runs/variants64")
VARIANTS = {
    "steps2000": "`patch_lite` (the reference)",
    "fold": "`model.preset=patch_fold`",
    "p24": "`refine.patch_size=24`",
    "s2d16": "try_space_to_depth.py 16,32,32 (= patch_fold)",
    "s2d8": "try_space_to_depth.py 8,16,32",
}


def rows(init: str) -> list[str]:
    base = {s: RUNS / f"steps2000-{init}-s{s}" for s in range(3)}
    out = []
    for name, label in VARIANTS.items():
        runs = {s: RUNS / f"{name}-{init}-s{s}" for s in range(3)}
        runs = {s: r for s, r in runs.items() if (r / "eval_test1" / "metrics.json").is_file()}
        if not runs:
            continue
        val = "; ".join(f"s{s}: {validation_mre(r):.3f} ({validation_mre(r) - validation_mre(base[s]):+.3f})"
                        for s, r in sorted(runs.items()))
        per_seed = [(s, compare_pair(per_image_errors(r / "eval_test1"),
                                     per_image_errors(base[s] / "eval_test1")),
                     sdr2(r / "eval_test1")) for s, r in sorted(runs.items())]
        mre, sdr, over, seeds = summary(per_seed)
        if name == "steps2000":
            over, seeds = "(reference)", ""
        out.append(f"| {init} | {label} | {len(runs)} | {val} | {mre} | {sdr} | {over} | {seeds} |")
    return out


def main() -> None:
    lines = ["| init | local network | seeds | validation MRE per seed (- patch_lite) | Test1 MRE | "
             "SDR 2 mm | - patch_lite over seeds [95 % t] | per seed: difference [bootstrap 95 %], "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
    lines += rows("scratch") + rows("ddpm")
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
