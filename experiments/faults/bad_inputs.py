"""The bad-input battery: every kind of bad input a user can hand the project, run through the
command line on a tiny dataset in the generic layout written here, and whether it is refused
before the run starts (exit status 2, nothing in the run folder).

    python experiments/faults/bad_inputs.py            # prints the Markdown table
    rows = battery_rows()                              # [(kind, first error line, refused)]

tests/data/test_bad_inputs.py runs the same CASES and also asserts each error's class and
message. The dataset: 10 gray PNGs of 48 x 32 pixels, 3 landmarks, 0.1 mm/px, split train
(000-005) / test1 (006-009); the fine-tuning run draws 4 + 2 validation images from train and
is scored on test1, so a broken test1 image is one the run would read.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import yaml

from ddpm_landmarks.errors import ConfigError, DataError

WIDTH, HEIGHT, NUM_IMAGES, NUM_TRAIN = 48, 32, 10, 6
POINTS = [(10.0, 8.0), (30.0, 16.0), (40.0, 25.0)]
BAD = "009.png"                          # a test1 image: every fine-tuning run reads it


# ------------------------------------------------------------------------- the tiny dataset

def write_dataset(root: Path) -> Path:
    """The generic layout (data/generic.py): images/, landmarks.csv, manifest.csv."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    marks, manifest = ["image,landmark_index,x,y"], ["image,spacing_mm,split"]
    for i in range(NUM_IMAGES):
        name = f"{i:03d}.png"
        image = rng.integers(0, 256, size=(HEIGHT, WIDTH)).astype(np.uint8)
        assert cv2.imwrite(str(root / "images" / name), image)
        marks += [f"{name},{k},{x + i % 3},{y}" for k, (x, y) in enumerate(POINTS)]
        manifest.append(f"{name},0.1,{'train' if i < NUM_TRAIN else 'test1'}")
    (root / "landmarks.csv").write_text("\n".join(marks) + "\n")
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return root


def run_configs(work: Path, root: Path) -> dict[str, Path]:
    """One YAML config per command, every run folder under work/runs."""
    data = {"dataset": "generic", "root": str(root), "image_size": 32}
    train = {"max_steps": 2, "batch_size": 2, "num_workers": 0, "eval_every": 0,
             "checkpoint_every": 0, "log_every": 1}
    common = {"logger": {"kind": "none"}, "run": {"output_dir": str(work / "runs")}}
    configs = {
        "finetune": {"data": data, "fewshot": {"budget": 4, "val_count": 2},
                     "model": {"init": "scratch", "pretrained_path": "", "preset": "tiny"},
                     "augment": {"rotation_deg": 0.0}, "train": train,
                     **common, "run": {**common["run"], "name": "finetune"}},
        "pretrain": {"data": data, "unlabeled": {"labelled_splits": ["train"]},
                     "model": {"preset": "tiny"}, "train": {**train, "image_every": 0},
                     **common, "run": {**common["run"], "name": "pretrain"}},
        "classify": {"data": data, "labels": {"file": str(root / "labels.csv")},
                     "model": {"arch": "ddpm_unet", "init": "scratch", "preset": "tiny"},
                     "train": train, **common, "run": {**common["run"], "name": "classify"}},
    }
    paths = {}
    for command, config in configs.items():
        paths[command] = work / f"{command}.yaml"
        paths[command].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


# ------------------------------------------------------------------------- mutations

def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _point(x: str, y: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        _edit(root / "landmarks.csv", f"{BAD},1,{POINTS[1][0] + 0.0},{POINTS[1][1]}",
              f"{BAD},1,{x},{y}")
    return apply


def _as_jpeg(root: Path, cut: Callable[[bytes], bytes]) -> None:
    """Replace BAD by a JPEG named 009.jpg, damaged by `cut`."""
    image = cv2.imread(str(root / "images" / BAD), cv2.IMREAD_UNCHANGED)
    (root / "images" / BAD).unlink()
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    (root / "images" / "009.jpg").write_bytes(cut(data.tobytes()))
    for name in ("landmarks.csv", "manifest.csv"):
        _edit(root / name, BAD, "009.jpg")


def _outside_file(root: Path) -> Path:
    outside = root.parent / "outside" / "x.png"
    outside.parent.mkdir(exist_ok=True)
    shutil.copy(root / "images" / BAD, outside)
    return outside


def _rename_in_csvs(root: Path, new: str) -> None:
    for name in ("landmarks.csv", "manifest.csv"):
        _edit(root / name, BAD, new)


def _escape(root: Path) -> None:
    _outside_file(root)
    _rename_in_csvs(root, "../../outside/x.png")


def _absolute(root: Path) -> None:
    _rename_in_csvs(root, str(_outside_file(root)))


def _symlink_out(root: Path) -> None:
    outside = _outside_file(root)
    (root / "images" / BAD).unlink()
    (root / "images" / BAD).symlink_to(outside)


def _duplicate_id(root: Path) -> None:
    shutil.copy(root / "images" / BAD, root / "images" / "009.bmp")
    rows = [line.replace(BAD, "009.bmp") for line in
            (root / "landmarks.csv").read_text().splitlines() if line.startswith(BAD)]
    with open(root / "landmarks.csv", "a") as fh:
        fh.write("\n".join(rows) + "\n")
    with open(root / "manifest.csv", "a") as fh:
        fh.write("009.bmp,0.1,test1\n")


def _drop_row(root: Path) -> None:
    _edit(root / "landmarks.csv", f"{BAD},2,{POINTS[2][0] + 0.0},{POINTS[2][1]}\n", "")


def _duplicate_row(root: Path) -> None:
    with open(root / "landmarks.csv", "a") as fh:
        fh.write(f"{BAD},0,1.0,1.0\n")


def _spacing(value: str) -> Callable[[Path], None]:
    return lambda root: _edit(root / "manifest.csv", f"{BAD},0.1,", f"{BAD},{value},")


def _bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "images" / BAD
        path.write_bytes(change(path.read_bytes()))
    return apply


def _scramble(data: bytes) -> bytes:
    return data[:2] + bytes(range(200)) + data[202:]


# ------------------------------------------------------------------------- the cases

@dataclass
class Case:
    kind: str
    error: type                          # ConfigError or DataError
    message: str                         # a regular expression the message must match
    command: str = "finetune"
    setup: Optional[Callable[[Path], None]] = None    # damages the dataset copy
    overrides: list[str] = field(default_factory=list)


CASES = [
    Case("missing image file", DataError, r"image file not found: .*009\.png",
         setup=lambda root: (root / "images" / BAD).unlink()),
    Case("empty image file", DataError, r"009\.png: empty file \(0 bytes\)",
         setup=_bytes(lambda data: b"")),
    Case("truncated PNG", DataError, r"009\.png: truncated PNG \(no IEND chunk",
         setup=_bytes(lambda data: data[: len(data) // 2])),
    Case("corrupt JPEG", DataError, r"cannot read image \(corrupt or unsupported format\): "
         r".*009\.jpg", setup=lambda root: _as_jpeg(root, _scramble)),
    Case("truncated JPEG", DataError, r"009\.jpg: truncated JPEG \(no end-of-image marker",
         setup=lambda root: _as_jpeg(root, lambda data: data[: len(data) // 2])),
    Case("wrong landmark count", DataError, r"landmarks\.csv line \d+: image 009\.png has 2 "
         r"landmark rows, expected 3", setup=_drop_row),
    Case("duplicate landmark row", DataError, r"duplicate row for image 009\.png landmark 0",
         setup=_duplicate_row),
    Case("NaN coordinate", DataError, r"coordinate 'nan' is not finite", setup=_point("nan", "16")),
    Case("infinite coordinate", DataError, r"coordinate 'inf' is not finite",
         setup=_point("inf", "16")),
    Case("non-numeric coordinate", DataError, r"landmarks\.csv line \d+: non-numeric coordinate "
         r"'abc'", setup=_point("abc", "16")),
    Case("coordinate far outside the image", DataError, r"landmarks\.csv line \d+ \(009\.png\): "
         r"landmark 1 at \(-5000, 1e\+12\) lies outside the 48x32 image",
         setup=_point("-5000", "1e12")),
    Case("x and y swapped", DataError, r"landmark 1 at \(16, 45\) lies outside the 48x32 image",
         setup=_point("16", "45")),
    Case("image path escaping the root", DataError, r"image path '\.\./\.\./outside/x\.png' "
         r"leaves the dataset folder", setup=_escape),
    Case("absolute image path", DataError, r"image path '/.*/outside/x\.png' is absolute",
         setup=_absolute),
    Case("symlink leading out of the root", DataError, r"image path '009\.png' is a link to "
         r".*outside/x\.png, outside the dataset folder", setup=_symlink_out),
    Case("duplicate image id", DataError, r"image id 009 used twice \(009\.png, 009\.bmp\)",
         setup=_duplicate_id),
    Case("implausible spacing", DataError, r"009\.png\): pixel spacing \(100\.0, 100\.0\) mm is "
         r"not within the plausible 0\.01-5\.0 mm", setup=_spacing("100")),
    Case("negative spacing", DataError, r"manifest\.csv line 11: spacing_mm must be positive",
         setup=_spacing("-0.1")),
    Case("missing landmarks file", DataError, r"landmarks file not found",
         setup=lambda root: (root / "landmarks.csv").unlink()),
    Case("missing dataset folder", DataError, r"data folder not found: /nonexistent",
         overrides=["data.root=/nonexistent/dataset"]),
    Case("missing label file", DataError, r"label file not found: .*labels\.csv",
         command="classify"),
    Case("unknown config key", ConfigError, r"unknown config key 'train\.batchsize'",
         overrides=["train.batchsize=4"]),
    Case("non-numeric config value", ConfigError, r"train\.batch_size: expected int, got 'eight'",
         overrides=["train.batch_size=eight"]),
    Case("batch size 0", ConfigError, r"train\.batch_size: 0 is outside the allowed range >= 1",
         overrides=["train.batch_size=0"]),
    Case("heatmap sigma 0", ConfigError, r"heatmap\.sigma: 0\.0 is outside the allowed range > 0",
         overrides=["heatmap.sigma=0"]),
    Case("negative image size", ConfigError, r"data\.image_size: -64 is outside the allowed range",
         overrides=["data.image_size=-64"]),
    Case("probability above 1", ConfigError, r"augment\.flip_prob: 1\.5 is outside the allowed "
         r"range \[0, 1\]", overrides=["augment.flip_prob=1.5"]),
    Case("reversed range", ConfigError, r"augment\.scale: \[1\.2, 0\.8\] must be ordered",
         overrides=["augment.scale=[1.2, 0.8]"]),
    Case("negative learning rate", ConfigError, r"optim\.lr: -0\.0001 is outside",
         overrides=["optim.lr=-1e-4"]),
    Case("unknown training split", DataError, r"data\.train_split: .*no images in split 'trian'",
         overrides=["data.train_split=trian"]),
    Case("unknown evaluation split", DataError, r"data\.eval_split: .*no images in split "
         r"'tset1'", overrides=["data.eval_split=tset1"]),
    Case("label budget larger than the pool", ConfigError, r"fewshot: budget of 100 labelled "
         r"images is larger than the training pool of 6",
         overrides=["fewshot.budget=100"]),
    Case("image size the DDPM U-Net cannot take", ConfigError, r"model: model preset 'tiny' has 3 "
         r"levels: the image size must be a positive multiple of 4, got 30",
         overrides=["data.image_size=30"]),
    Case("smp image size not a multiple of 32", ConfigError, r"data\.image_size: 48 is not a "
         r"multiple of 32", overrides=["model.arch=smp_unet", "data.image_size=48"]),
    Case("test split in the pretraining pool", ConfigError, r"unlabeled\.labelled_splits: "
         r"\['train', 'test1'\] includes data\.eval_split 'test1'", command="pretrain",
         overrides=["unlabeled.labelled_splits=[train, test1]"]),
    Case("pretraining image that does not decode", DataError, r"009\.png: truncated PNG \(no IEND "
         r"chunk at its end\) \(an image the pretraining run reads", command="pretrain",
         setup=_bytes(lambda data: data[: len(data) // 2]),
         overrides=["unlabeled.labelled_splits=[]",
                    "unlabeled.pools=[{path: '{root}/images', name: all}]"]),
]


# ------------------------------------------------------------------------- running a case

def prepare(case: Case, work: Path) -> tuple[Path, list[str], Path]:
    """A fresh damaged dataset in `work`: (the command's config, overrides, run folder)."""
    root = write_dataset(work / "dataset")
    if case.setup is not None:
        case.setup(root)
    configs = run_configs(work, root)
    overrides = [o.replace("{root}", str(root)) for o in case.overrides]
    return configs[case.command], overrides, work / "runs" / case.command


def call_entry(case: Case, config: Path, overrides: list[str]) -> None:
    """The entry function itself (what `accelerate launch -m ...` runs): raises the error."""
    from ddpm_landmarks.config.schema import load_config
    if case.command == "finetune":
        from ddpm_landmarks.config.finetune import FinetuneConfig
        from ddpm_landmarks.finetune import finetune
        finetune(load_config(config, overrides, cls=FinetuneConfig))
    elif case.command == "pretrain":
        from ddpm_landmarks.config.pretrain import PretrainConfig
        from ddpm_landmarks.pretrain import pretrain
        pretrain(load_config(config, overrides, cls=PretrainConfig))
    else:
        from ddpm_landmarks.classify import classify
        from ddpm_landmarks.config.classify import ClassifyConfig
        classify(load_config(config, overrides, cls=ClassifyConfig))


def run_cli(case: Case, work: Path) -> tuple[int, str, Path]:
    """`ddpm-landmarks <command> CONFIG overrides` on a fresh damaged copy: (exit status,
    stderr, run folder)."""
    from ddpm_landmarks.cli.main import main
    config, overrides, run_dir = prepare(case, work)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([case.command, str(config), *overrides])
    return status, err.getvalue(), run_dir


def nothing_written(run_dir: Path) -> bool:
    """No file of the run in its folder (the lock a run takes on its folder is not one)."""
    return not run_dir.exists() or not any(p.name != ".lock" for p in run_dir.iterdir())


def battery_rows(cases: list[Case] = CASES) -> list[tuple[str, str, bool]]:
    """(kind, first line of the error, refused before the run started) for every case."""
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
            status, err, run_dir = run_cli(case, Path(tmp))
            first = next((line for line in err.splitlines() if line.startswith("error:")),
                         err.strip().splitlines()[-1] if err.strip() else "(no error)")
            rows.append((case.kind, first, status == 2 and nothing_written(run_dir)))
    return rows


def markdown(rows: list[tuple[str, str, bool]]) -> str:
    lines = ["| kind | error (first line) | refused before the run started |", "|---|---|---|"]
    for kind, error, refused in rows:
        error = error.replace("|", "\\|")
        lines.append(f"| {kind} | `{error}` | {'yes' if refused else 'no'} |")
    return "\n".join(lines)


def main() -> int:
    rows = battery_rows()
    print(markdown(rows))
    refused = sum(r[2] for r in rows)
    print(f"\n{refused} of {len(rows)} kinds of bad input refused before the run started")
    return 0 if refused == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
