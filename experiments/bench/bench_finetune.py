"""Benchmark of heatmap-regressor fine-tuning and inference: training throughput, inference
throughput and single-image latency (with the landmark decoder), peak memory, FLOPs and the
share of the machine's measured matmul peak.

    .venv/bin/python experiments/bench/bench_finetune.py [--sizes 64 128 256]
        [--presets tiny small base] [--batch 8] [--steps N] [--warmup 1] [--repeats N]
        [--threads N] [--device auto|cpu|cuda] [--bf16] [--out PATH]

Model: build_regressor(RegressorConfig(init="scratch", preset=P), num_landmarks=19,
image_size=S); default pairs 64 px / tiny, 128 px / small, 256 px / base.

- Training: full steps (forward, heatmap_loss("mse") on Gaussian targets from
  data.heatmaps.make_targets at random points, backward, AdamW over param_groups, zero_grad);
  median s/step over the timed steps after `--warmup` untimed ones. `--bf16` adds a bf16
  autocast run next to fp32.
- Inference: eval mode + torch.no_grad; forward and decode(heatmaps, DecoderConfig()) are timed
  SEPARATELY in every repeat (decode includes the copy to host memory), and the end-to-end figure
  is the median of their per-repeat sum. Batch `--batch` for images/s, batch 1 for latency.
- Memory: every (size, train|infer, precision) runs in a FRESH subprocess, so nothing carries
  over between configurations. CPU: the process's peak RSS (getrusage ru_maxrss: torch, the
  libraries and everything else included) and that peak minus the process's RSS just before the
  model was built (model, optimiser state, data, activations, allocator slack). CUDA:
  torch.cuda.max_memory_allocated after reset_peak_memory_stats (taken before the model is built).
- FLOPs: FlopCounterMode on the real device at batch 1 (fwd + bwd for training, fwd for
  inference) times the batch (matmul / conv / attention FLOPs are linear in the batch; the AdamW
  update and the elementwise ops are not counted). Share = FLOP/s over the fp32 (bf16 rows: also
  bf16) matmul peak measured in this run by bench_pretrain.matmul_peak with the same threads.

Defaults: 6 timed steps and 10 inference repeats; on CPU at >= 256 px 2 steps and 3 repeats
(the report says so) so that all three sizes finish in ~10 minutes on 2 cores. The report is
printed (progress goes to stderr) and written atomically to results_finetune_{cpu,cuda}.md next
to this script (`--out` elsewhere, `--out ''` not at all).
"""
from __future__ import annotations

import argparse
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (sibling script: cpu_model, matmul_peak, _status_kib)

from ddpm_landmarks.config.common import DecoderConfig, HeatmapConfig  # noqa: E402
from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.heatmaps.decoders import DECODERS, decode  # noqa: E402
from ddpm_landmarks.heatmaps.losses import heatmap_loss  # noqa: E402
from ddpm_landmarks.heatmaps.targets import make_targets  # noqa: E402
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.models.unet import PRESETS, count_parameters  # noqa: E402

NUM_LANDMARKS = 19
SIZE_PRESET = {64: "tiny", 128: "small", 256: "base"}
DEFAULT_STEPS, DEFAULT_REPEATS = 6, 10
REDUCED_AT, REDUCED_STEPS, REDUCED_REPEATS = 256, 2, 3      # CPU only
HERE = Path(__file__).resolve().parent


def use_device(device: torch.device) -> None:
    """bench_pretrain's helpers read its module globals at call time: point them at `device`."""
    bp.DEVICE, bp.CUDA = device, device.type == "cuda"


# ---------------------------------------------------------------------------------- worker
def make_model(spec: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = RegressorConfig(init="scratch", preset=spec["preset"])
    return build_regressor(cfg, num_landmarks=NUM_LANDMARKS, image_size=spec["size"]).to(device)


def make_batch(batch: int, size: int, device: torch.device):
    """Images in [-1, 1] and Gaussian targets (sigma 3 px) + masks at random points."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 1, size, size)).astype(np.float32))
    maps, masks = zip(*(make_targets(rng.uniform(0, size, (NUM_LANDMARKS, 2)), (size, size),
                                     HeatmapConfig()) for _ in range(batch)))
    target = torch.from_numpy(np.stack(maps))
    mask = torch.from_numpy(np.stack(masks))
    return x.to(device), target.to(device), mask.to(device)


def train_worker(spec: dict, device: torch.device, bf16: bool) -> dict:
    model = make_model(spec, device).train()
    opt = torch.optim.AdamW(param_groups(model, body_lr=1e-4, head_lr=1e-3, weight_decay=1e-4))
    out: dict = {"params": count_parameters(model)}

    def step(x, target, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = heatmap_loss("mse", model(x), target, mask)
        loss.backward()
        return loss

    if spec["count_flops"]:
        x1, t1, m1 = make_batch(1, spec["size"], device)
        counter = FlopCounterMode(display=False)
        with counter:
            step(x1, t1, m1)
        opt.zero_grad(set_to_none=True)
        out["flops"] = counter.get_total_flops() * spec["batch"]
        del x1, t1, m1

    x, target, mask = make_batch(spec["batch"], spec["size"], device)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        bp.sync()
        t0 = time.perf_counter()
        loss = step(x, target, mask)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bp.sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    out.update(times=times, loss=float(loss))
    return out


def infer_worker(spec: dict, device: torch.device, bf16: bool) -> dict:
    model = make_model(spec, device).eval()
    dcfg = DecoderConfig(name=spec["decoder"])
    out: dict = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if spec["count_flops"]:
            counter = FlopCounterMode(display=False)
            with counter:
                model(make_batch(1, spec["size"], device)[0])
            out["flops_per_img"] = counter.get_total_flops()
        for batch in (spec["batch"], 1):
            x = make_batch(batch, spec["size"], device)[0]
            fwd, dec, tot = [], [], []
            for i in range(spec["warmup"] + spec["repeats"]):
                bp.sync()
                t0 = time.perf_counter()
                heatmaps = model(x)
                bp.sync()
                t1 = time.perf_counter()
                points, _ = decode(heatmaps, dcfg)
                t2 = time.perf_counter()
                if i >= spec["warmup"]:
                    fwd.append(t1 - t0)
                    dec.append(t2 - t1)
                    tot.append(t2 - t0)
            assert points.shape == (batch, NUM_LANDMARKS, 2), points.shape
            out[f"b{'n' if batch == spec['batch'] else '1'}"] = {"fwd": fwd, "dec": dec, "tot": tot}
    return out


def worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    use_device(device)
    torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_kib = bp._status_kib("VmRSS")
    bf16 = spec["precision"] == "bf16"
    fn = train_worker if spec["kind"] == "train" else infer_worker
    out = fn(spec, device, bf16)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["base_rss_mib"] = base_kib / 1024 if base_kib is not None else None
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_worker(spec: dict) -> dict:
    """One configuration in a fresh interpreter; its result is the last line of its stdout."""
    t0 = time.perf_counter()
    label = f"{spec['size']} px {spec['preset']} {spec['kind']} {spec['precision']}"
    print(f"[bench_finetune] {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker failed ({label}), exit {proc.returncode}")
    print(f"[bench_finetune] {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = os.getloadavg()[0]        # 1-min load average as the worker ends
    return out


# ---------------------------------------------------------------------------------- report
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def command_line() -> str:
    py = os.path.relpath(sys.executable)
    return shlex.join([sys.executable if py.startswith("..") else py] + sys.argv)


def resolve_configs(p: argparse.ArgumentParser, args) -> list[tuple[int, str]]:
    if args.sizes is None and args.presets is None:
        return list(SIZE_PRESET.items())
    if args.sizes is None:
        return [(PRESETS[pr]["resolution"], pr) for pr in args.presets]
    presets = args.presets
    if presets is None:
        missing = [s for s in args.sizes if s not in SIZE_PRESET]
        if missing:
            p.error(f"no default preset for sizes {missing}; pass --presets")
        presets = [SIZE_PRESET[s] for s in args.sizes]
    elif len(presets) == 1:
        presets = presets * len(args.sizes)
    elif len(presets) != len(args.sizes):
        p.error("--presets needs one preset, or one per --sizes entry")
    return list(zip(args.sizes, presets))


def main() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="default: 64 128 256")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), default=None,
                   help="one per size (default 64: tiny, 128: small, 256: base), or one for all")
    p.add_argument("--batch", type=int, default=8, help="training and inference batch")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed training steps (default {DEFAULT_STEPS}; on CPU {REDUCED_STEPS} "
                        f"at >= {REDUCED_AT} px)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps / repeats first")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed inference repeats per batch size (default {DEFAULT_REPEATS}; on "
                        f"CPU {REDUCED_REPEATS} at >= {REDUCED_AT} px)")
    p.add_argument("--threads", type=int, default=cores)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", action="store_true", help="also measure bf16 autocast")
    p.add_argument("--decoder", choices=list(DECODERS), default=DecoderConfig().name)
    p.add_argument("--out", default=None,
                   help="report file (default results_finetune_<device>.md next to this "
                        "script; '' = do not write)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    wall0 = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    use_device(device)
    torch.set_num_threads(args.threads)
    configs = resolve_configs(p, args)
    precisions = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    cuda = device.type == "cuda"

    def n_for(size: int, given: int | None, default: int, reduced: int) -> int:
        if given is not None:
            return given
        return reduced if not cuda and size >= REDUCED_AT else default

    dev_name = torch.cuda.get_device_name(device) if cuda else bp.cpu_model()
    load0 = os.getloadavg()
    peak32, peak16 = bp.matmul_peak(torch.float32), bp.matmul_peak(torch.bfloat16)

    results: dict = {}
    for size, preset in configs:
        base = {"size": size, "preset": preset, "batch": args.batch, "warmup": args.warmup,
                "threads": args.threads, "device": device.type, "decoder": args.decoder,
                "steps": n_for(size, args.steps, DEFAULT_STEPS, REDUCED_STEPS),
                "repeats": n_for(size, args.repeats, DEFAULT_REPEATS, REDUCED_REPEATS)}
        for prec in precisions:
            for kind in ("train", "infer"):
                spec = dict(base, kind=kind, precision=prec, count_flops=prec == "fp32")
                results[size, preset, kind, prec] = (spec, run_worker(spec))

    end32, end16 = bp.matmul_peak(torch.float32), bp.matmul_peak(torch.bfloat16)
    load1 = os.getloadavg()
    peak32, peak16 = max(peak32, end32), max(peak16, end16)
    wall = time.perf_counter() - wall0

    # ------------------------------------------------------------------ Markdown
    L: list[str] = []
    steps_note = "; ".join(
        f"{s} px: {results[s, pr, 'train', 'fp32'][0]['steps']} steps, "
        f"{results[s, pr, 'infer', 'fp32'][0]['repeats']} repeats" for s, pr in configs)
    reduced = not cuda and any(s >= REDUCED_AT for s, _ in configs) and \
        (args.steps is None or args.repeats is None)
    L += ["## Heatmap-regressor fine-tuning / inference benchmark", "",
          f"- device: {device.type}, {dev_name}",
          f"- torch {torch.__version__}, threads {args.threads} (of {cores} usable cores)",
          f"- model: build_regressor(RegressorConfig(init=\"scratch\", preset=P), "
          f"num_landmarks={NUM_LANDMARKS}, image_size=S); batch {args.batch}; "
          f"{args.warmup} warm-up step/repeat, then median of the timed ones ({steps_note})"
          + (f" -- REDUCED at >= {REDUCED_AT} px on CPU to stay within ~10 minutes" if reduced
             else ""),
          f"- every configuration ran in a fresh subprocess; total wall time {wall:.0f} s",
          "",
          f"Measured peak (2048x2048 @ 2048x2048 matmul, median of 10, higher of the readings "
          f"before / after the runs): fp32 {peak32:.1f} GFLOP/s (after: {end32:.1f}), bf16 "
          f"{peak16:.1f} GFLOP/s (after: {end16:.1f}).",
          f"Load average (1 min) at start / end: {load0[0]:.2f} / {load1[0]:.2f} on {cores} "
          f"cores (above the thread count = other processes competed).", ""]

    if cuda:
        mem_hdr, mem_sep = "peak GPU alloc MiB", "---|"
    else:
        mem_hdr, mem_sep = "peak RSS MiB (process) | RSS over pre-model baseline MiB", "---|---|"

    def mem_cells(r: dict) -> str:
        if cuda:
            return f"{r['cuda_peak_mib']:.0f}"
        over = r["peak_rss_mib"] - r["base_rss_mib"] if r["base_rss_mib"] is not None else None
        return f"{r['peak_rss_mib']:.0f} | " + (f"{over:.0f}" if over is not None else "n/a")

    def share(gflops: float, prec: str) -> str:
        s = f"{100 * gflops / peak32:.1f}"
        return s + (f" ({100 * gflops / peak16:.1f} of bf16)" if prec == "bf16" else "")

    L += ["### Fine-tuning step (fwd, MSE heatmap loss, bwd, AdamW, zero_grad)", "",
          f"| px | preset | params | precision | GFLOP/step (fwd+bwd) | s/step | img/s | "
          f"GFLOP/s | % of fp32 matmul peak | s/step (min) | img/s (best) | {mem_hdr} | "
          f"load (1 min) |",
          f"|---|---|---|---|---|---|---|---|---|---|---|{mem_sep}---|"]
    for size, preset in configs:
        flops = results[size, preset, "train", "fp32"][1]["flops"]
        for prec in precisions:
            r = results[size, preset, "train", prec][1]
            s = med(r["times"])
            g = flops / s / 1e9
            L.append(f"| {size} | {preset} | {r['params'] / 1e6:.2f} M | {prec} | "
                     f"{flops / 1e9:.1f} | {s:.3f} | {args.batch / s:.1f} | {g:.1f} | "
                     f"{share(g, prec)} | {min(r['times']):.3f} | "
                     f"{args.batch / min(r['times']):.1f} | {mem_cells(r)} | {r['load']:.2f} |")

    L += ["", f"### Inference (eval, no_grad; decoder {args.decoder!r} timed separately, "
              f"end-to-end = forward + decode)", "",
          f"| px | preset | precision | GFLOP/img (fwd) | b{args.batch} fwd img/s | "
          f"b{args.batch} fwd+decode img/s | b{args.batch} decode ms | "
          f"% of fp32 matmul peak (b{args.batch} fwd) | b1 fwd ms | b1 decode ms | "
          f"b1 latency fwd+decode ms | {mem_hdr} | load (1 min) |",
          f"|---|---|---|---|---|---|---|---|---|---|---|{mem_sep}---|"]
    for size, preset in configs:
        fpi = results[size, preset, "infer", "fp32"][1]["flops_per_img"]
        for prec in precisions:
            r = results[size, preset, "infer", prec][1]
            bn, b1 = r["bn"], r["b1"]
            g = fpi * args.batch / med(bn["fwd"]) / 1e9
            L.append(f"| {size} | {preset} | {prec} | {fpi / 1e9:.2f} | "
                     f"{args.batch / med(bn['fwd']):.1f} | {args.batch / med(bn['tot']):.1f} | "
                     f"{1e3 * med(bn['dec']):.1f} | {share(g, prec)} | "
                     f"{1e3 * med(b1['fwd']):.1f} | {1e3 * med(b1['dec']):.2f} | "
                     f"{1e3 * med(b1['tot']):.1f} | {mem_cells(r)} | {r['load']:.2f} |")

    L += ["", "Notes: medians unless marked; other processes can only slow a step down, so on "
              "a busy machine (load above the thread count) the min / best columns are the "
              "less disturbed figures. load = 1-min load average as that configuration's "
              "process ended. FLOPs are counted by FlopCounterMode at batch 1 on this device and "
              "multiplied by the batch (matmul / conv / attention only; AdamW and elementwise "
              "ops are not counted). "
          + ("Memory: torch.cuda.max_memory_allocated of a fresh process, reset before the "
             "model is built." if cuda else
             "Memory: ru_maxrss of a fresh process per configuration (the inference one peaks "
             f"at batch {args.batch}); the baseline is its VmRSS after the imports, before the "
             "model is built.")
          + f" Inputs and targets are made once, before timing; the data pipeline is not "
            f"measured. Untrained heatmaps are ~0, so every landmark decodes as missing; the "
            f"'{args.decoder}' decoder's cost does not depend on that"
          + (" (contour's does: it is understated here)." if args.decoder == "contour" else ".")]
    for size, preset in configs:
        for prec in precisions:
            loss = results[size, preset, "train", prec][1]["loss"]
            if not np.isfinite(loss):
                L.append(f"WARNING: non-finite training loss at {size} px {prec}: {loss}")

    report = "\n".join(L) + "\n"
    print(report, end="")
    out = args.out if args.out is not None else str(HERE / f"results_finetune_{device.type}.md")
    if out:
        date = datetime.date.today().isoformat()
        head = (f"# {device.type.upper()} fine-tuning benchmark, {date}, `{command_line()}` "
                f"({cores} usable cores, {dev_name})\n\n")
        path = Path(out)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(head + report)
        os.replace(tmp, path)
        print(f"[bench_finetune] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
