"""Benchmark of the two-stage pipeline (issue 15): stage-1 inference alone vs stage 1 +
refinement (images/s, latency per image, peak RSS), and a refinement training step.

    .venv/bin/python experiments/bench/bench_refine.py [--size 64] [--preset small]
        [--patch-size 32] [--grid 512] [--local-preset patch_fold] [--iterations 1]
        [--refined 19] [--share-radius 8] [--prior-weight 1] [--layout isbi|random]
        [--refine-json RUN/refine.json] [--batch 8] [--train-batch 32] [--repeats 30]
        [--threads N] [--out PATH]

What is timed, per image, exactly as `evaluate` / `predict` run it (inference/two_stage.py):
- stage 1: the stored image (a random 413 x 512 float image, the ISBI copies' size) warped
  onto the size x size grid (one cv2.warpAffine with antialiasing), the stage-1 regressor
  (19 landmarks, `--preset`, random init: speed does not depend on the weights), parabola
  decoding, mapping to original pixels;
- two stages: the same, then PatchRefiner.refine: per refined landmark a patch cut from the
  stored image (one warp), all patches of the batch in one forward of the local network
  (`--local-preset`, `--patch-size`), decoding, the inverse patch matrix (decoders never
  abstain here: random weights have low peaks); `--refined` landmarks
  (the per-landmark choice may refine fewer than 19), `--iterations` times (or each landmark
as often as a trained run's `--refine-json` says), with patches
  shared by landmarks within `--share-radius` patch pixels and the stage-1 prior at
  `--prior-weight` (refine.share_radius / prior_weight). The first refinement is centred on
  the sample's own landmarks (random weights decode meaningless points, and once patches are
  shared, where they fall decides their number): `--layout random` = uniform over the image,
  `isbi` = the mean ISBI 2015 training shape moved by N(0, 50 px) per image and N(0, 25 px)
  per landmark (original pixels), so that the sharing is the anatomy's.
Images/s at batch `--batch`, latency at batch 1 (medians over `--repeats` after a warm-up);
the overhead is (two-stage - stage 1) / stage 1 per image, with stage 1 timed in the two-stage
worker, alternating with the two stages (a shared machine's load drifts between workers).
Training: one optimiser step of the local network on `--train-batch` patches (forward, masked
heatmap MSE, backward, AdamW), and the time to make those items (PatchDataset: cut, jitter,
augment, targets). Every configuration runs in a fresh subprocess (peak RSS = ru_maxrss).
The defaults are configs/finetune/isbi2015_refine.yaml's pipeline (grid 512, `patch_fold`)
with every landmark refined; the study's was `--grid 256 --local-preset patch_lite`. A trained
run's `--refine-json` refines what it chose (2000-step runs: 16-19 of the 19 landmarks). The report is printed and appended to results_refine_cpu.md next to this
script (--out: another file).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (sibling script: cpu_model)

from ddpm_landmarks.config.common import AugmentConfig, DataConfig  # noqa: E402
from ddpm_landmarks.config.finetune import FinetuneConfig, RegressorConfig  # noqa: E402
from ddpm_landmarks.data.patches import PatchDataset  # noqa: E402
from ddpm_landmarks.data.sample import LandmarkDataset, LandmarkSample, Record  # noqa: E402
from ddpm_landmarks.data.transforms import LandmarkTransform, map_to_original  # noqa: E402
from ddpm_landmarks.heatmaps.decoders import decode, never_abstain  # noqa: E402
from ddpm_landmarks.heatmaps.losses import heatmap_loss  # noqa: E402
from ddpm_landmarks.inference.predictor import HeatmapPredictor  # noqa: E402
from ddpm_landmarks.inference.two_stage import (  # noqa: E402
    PatchRefiner,
    RefineSettings,
    TwoStagePredictor,
    model_input,
)
from ddpm_landmarks.models.registry import build_regressor  # noqa: E402
from ddpm_landmarks.models.regressor import param_groups  # noqa: E402

K = 19
ORIGINAL, STORED = (1935, 2400), (413, 512)
HERE = Path(__file__).resolve().parent
# Mean of the 150 ISBI 2015 training annotations (mean of the two doctors), original pixels.
ISBI_MEAN_SHAPE = np.array([
    [807, 1038], [1390, 969], [1278, 1219], [600, 1212], [1384, 1513], [1357, 1851],
    [1352, 1980], [1292, 2041], [1334, 2021], [733, 1735], [1420, 1689], [1437, 1701],
    [1556, 1609], [1533, 1810], [1497, 1490], [1445, 2012], [974, 1428], [1401, 1445],
    [670, 1327]], dtype=np.float64)


def fake_sample(seed: int, layout: str = "random") -> LandmarkSample:
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (STORED[1], STORED[0])).astype(np.float32)
    if layout == "isbi":
        points = ISBI_MEAN_SHAPE + rng.normal(0, 50, 2) + rng.normal(0, 25, (K, 2))
    else:
        points = rng.uniform([200, 200], [1700, 2200], (K, 2))
    return LandmarkSample(f"img{seed}", image, points, (0.1, 0.1), ORIGINAL)


def make_cfg(a: dict) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.data = dataclasses.replace(cfg.data, image_size=a["size"])
    cfg.refine = dataclasses.replace(cfg.refine, enabled=True, patch_size=a["patch_size"],
                                     grid=a["grid"], iterations=a["iterations"],
                                     share_radius=a["share_radius"],
                                     prior_weight=a["prior_weight"])
    cfg.heatmap = dataclasses.replace(cfg.heatmap, sigma=1.5)
    # Random weights give peaks below any threshold: decode every channel, so that every
    # landmark is refined as it would be with trained weights.
    cfg.decoder = never_abstain(cfg.decoder)
    return cfg


def predictor(a: dict, two_stage: bool):
    torch.manual_seed(0)
    cfg = make_cfg(a)
    stage1 = build_regressor(RegressorConfig(init="scratch", preset=a["preset"]), K,
                             a["size"]).eval()
    first = HeatmapPredictor(stage1, cfg.loss, cfg.heatmap, cfg.decoder, device="cpu")
    if not two_stage:
        return first, cfg
    local = build_regressor(RegressorConfig(init="scratch", preset=a["local_preset"]), K,
                            a["patch_size"]).eval()
    iterations = [a["iterations"]] * a["refined"] + [0] * (K - a["refined"])
    if a["refine_json"]:                      # a trained run's per-landmark choice
        iterations = json.loads(Path(a["refine_json"]).read_text())["iterations"]
    refiner = PatchRefiner(local, cfg, RefineSettings(iterations), device="cpu")
    return TwoStagePredictor(first, refiner), cfg


def infer(a: dict, two_stage: bool) -> dict:
    pred, cfg = predictor(a, two_stage)
    transform = LandmarkTransform(DataConfig(image_size=a["size"]), AugmentConfig())
    samples = [fake_sample(i, a["layout"]) for i in range(a["batch"])]
    patches = []

    def run(batch: list, refine: bool = two_stage) -> None:
        inputs = [model_input(s, transform) for s in batch]      # warp onto the model grid
        images = torch.stack([x for x, _ in inputs])
        sources = [src for _, src in inputs]
        if refine:
            # TwoStagePredictor.predict, with the first patches around the samples' landmarks.
            maps = pred.stage1.heatmaps(images)
            points, peak = decode(maps, pred.stage1.decoder_cfg)
            [map_to_original(q, src.model_to_original) for q, src in zip(points, sources)]
            out = pred.refiner.refine(maps.numpy(), np.stack([s.landmarks for s in batch]),
                                      peak, sources)
            patches.extend(out.patches.tolist())
        else:
            points, _ = (pred.stage1 if two_stage else pred)(images)
            [map_to_original(q, src.model_to_original) for q, src in zip(points, sources)]

    # The two-stage worker also times stage 1 alone, alternating with the two stages, so that
    # the load of a shared machine weighs on both alike (the overhead is taken from these).
    out = {}
    for name, batch in (("batch", samples), ("single", samples[:1])):
        times, alone = [], []
        for i in range(a["repeats"] + 1):
            t0 = time.perf_counter()
            run(batch)
            t1 = time.perf_counter()
            if two_stage:
                run(batch, refine=False)
            if i:
                times.append(t1 - t0)
                alone.append(time.perf_counter() - t1)
        out[name] = statistics.median(times) / len(batch)
        if two_stage:
            out[f"stage1_{name}"] = statistics.median(alone) / len(batch)
    out["patches_per_image"] = float(np.mean(patches)) if patches else 0.0
    return out


def train(a: dict) -> dict:
    cfg = make_cfg(a)
    records = [Record(f"img{i}", f"img{i}", fake_sample(i).landmarks, (0.1, 0.1), ORIGINAL,
                      "train") for i in range(4)]
    images = {f"img{i}": fake_sample(i).image for i in range(4)}
    data = PatchDataset(LandmarkDataset("bench", records, K, image_loader=lambda p: images[str(p)]),
                        dataclasses.replace(cfg.augment, flip_prob=0.0), cfg.heatmap,
                        a["patch_size"], a["grid"], np.full((4, K, 2), 10.0),
                        "visible" if a["share_radius"] else "own", seed=0,
                        share_radius=a["share_radius"])
    torch.manual_seed(0)
    model = build_regressor(RegressorConfig(init="scratch", preset=a["local_preset"]), K,
                            a["patch_size"]).train()
    opt = torch.optim.AdamW(param_groups(model, body_lr=1e-4, head_lr=1e-3, weight_decay=1e-4))
    items, steps = [], []
    for i in range(a["repeats"] + 1):
        t0 = time.perf_counter()
        batch = torch.utils.data.default_collate(
            [data[(i * a["train_batch"] + j) % len(data)] for j in range(a["train_batch"])])
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["bf16"]):
            loss = heatmap_loss("mse", model(batch["image"]), batch["heatmaps"], batch["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:
            items.append(t1 - t0)
            steps.append(t2 - t1)
    return {"step": statistics.median(steps), "items": statistics.median(items)}


def worker(a: dict, kind: str) -> dict:
    torch.set_num_threads(a["threads"])
    out = {"stage1": lambda: infer(a, False), "two_stage": lambda: infer(a, True),
           "train": lambda: train(a)}[kind]()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(a: dict, kind: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps([a, kind])],
                          capture_output=True, text=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": str(a["threads"])})
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {kind} failed with exit status {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = os.getloadavg()[0]
    return out


def report(a: dict, r: dict, wall: float) -> str:
    s1, s2, tr = r["stage1"], r["two_stage"], r["train"]
    ms = 1000.0
    loads = ", ".join(f"{k} {v['load']:.1f}" for k, v in r.items())
    lines = [
        "# Two-stage inference and refinement training (CPU)", "",
        f"- {datetime.date.today()}, {bp.cpu_model()}, {a['threads']} threads, torch "
        f"{torch.__version__}; `{shlex.join(sys.argv)}`",
        f"- stage 1: `{a['preset']}` U-Net at {a['size']} px, 19 landmarks; stage 2: "
        f"`{a['local_preset']}` U-Net on {a['patch_size']} px patches at grid {a['grid']}, "
        f"{a['refine_json'] or str(a['refined']) + ' landmarks refined ' + str(a['iterations']) + 'x'}"
        f" per image, share radius "
        f"{a['share_radius']:g} patch px, prior weight {a['prior_weight']:g}, layout "
        f"`{a['layout']}`: **{s2['patches_per_image']:.1f} patches per image**",
        f"- 1-min load average at the end of each worker: {loads} (the machine is shared); "
        f"wall {wall:.0f} s", "",
        "| pipeline | images/s (batch %d) | ms / image (batch %d) | latency / image (batch 1) | "
        "peak RSS |" % (a["batch"], a["batch"]), "|---|---|---|---|---|"]
    for name, v in (("stage 1", s1), ("stage 1 + refinement", s2)):
        lines.append(f"| {name} | {1 / v['batch']:.1f} | {v['batch'] * ms:.1f} | "
                     f"{v['single'] * ms:.1f} ms | {v['peak_rss_mib'] / 1024:.2f} GiB |")
    over_b = s2["batch"] / s2["stage1_batch"] - 1
    over_1 = s2["single"] / s2["stage1_single"] - 1
    lines += ["", f"Refinement adds **{100 * over_b:+.0f} %** per image at batch {a['batch']} "
              f"and {100 * over_1:+.0f} % at batch 1 (target: at most +50 %), against stage 1 "
              f"timed in the same process, alternating: {s2['stage1_batch'] * ms:.1f} ms per "
              f"image at batch {a['batch']}, {s2['stage1_single'] * ms:.1f} ms at batch 1.", "",
              f"Refinement training step ({a['train_batch']} patches of {a['patch_size']} px, "
              f"{'bf16' if a['bf16'] else 'fp32'}): {tr['step'] * ms:.0f} ms "
              f"({a['train_batch'] / tr['step']:.0f} patches/s), making the items "
              f"{tr['items'] * ms:.0f} ms, peak RSS {tr['peak_rss_mib'] / 1024:.2f} GiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--preset", default="small")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--grid", type=int, default=512)
    p.add_argument("--local-preset", default="patch_fold")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--refined", type=int, default=K)
    p.add_argument("--share-radius", type=float, default=8.0)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--layout", choices=("random", "isbi"), default="isbi")
    p.add_argument("--refine-json", default="",
                   help="per-landmark iterations from a refinement run's refine.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)   # batch-1 medians of 10 vary by ~10 points
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step")
    p.add_argument("--out", default=str(HERE / "results_refine_cpu.md"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        a, kind = json.loads(args.worker)
        print(json.dumps(worker(a, kind)))
        return
    a = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    t0 = time.time()
    results = {}
    for kind in ("stage1", "two_stage", "train"):
        print(f"[bench_refine] {kind} ...", file=sys.stderr, flush=True)
        results[kind] = run_worker(a, kind)
    text = report(a, results, time.time() - t0)
    print(text)
    if args.out:
        from ddpm_landmarks.utils.atomic import atomic_write_text
        out = Path(args.out)
        before = out.read_text() + "\n" if out.is_file() else ""
        atomic_write_text(out, before + text)


if __name__ == "__main__":
    main()
