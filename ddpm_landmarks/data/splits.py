"""Few-shot label budgets: which N training images are labelled, and which validate.

- `draw_budget`: a seeded random draw of N images. The generator is seeded with
  (seed, N, draw), so every (N, draw) is reproducible on its own and independent of the others
  (draws of different N are NOT nested). The pool is sorted first, so the draw does not depend
  on the order in which files were listed.
- `first_n`: the original code's policy - the first N images in the order given - kept to
  reproduce its numbers; it gives one fixed set per N and no variance over draws.

Validation (`cfg.val_policy`):
- fixed_count:   cfg.val_count images drawn (seeded) from the pool left after the budget draw;
                 the N labelled training images are exactly the budget draw.
- within_budget: cfg.val_count of the N drawn images are held out for validation, so only N
                 labelled images are used in total (the strict few-shot setting).
- split:         the images of another split (cfg.val_split, passed in as `val_ids`), e.g. the
                 released code's fixed validation set; it must not share an image with the pool.
- none:          no validation images.

Calibration (`draw_calibration`): the images that calibrate the conformal prediction regions
(inference/calibration.py) are drawn the same way from what the budget and validation left.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import FewShotConfig
from ddpm_landmarks.utils.atomic import atomic_write_text

# Distinguishes the validation generator from the budget generator of the same (seed, draw).
_VAL_STREAM = 1
# ... and the calibration draw (draw_calibration) from both.
_CALIBRATION_STREAM = 2


@dataclass
class FewShotSplit:
    train_ids: list[str]
    val_ids: list[str]
    policy: str                          # human-readable description of how it was made
    seed: Optional[int] = None
    draw: Optional[int] = None
    budget: Optional[int] = None         # None = the whole pool
    selection: str = "random"            # random | first_n
    val_policy: str = "none"
    val_count: int = 0
    pool_size: Optional[int] = None


def _pool(ids: Sequence[str]) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate image ids in the training pool: {dup[:5]}")
    return ids


def _check_budget(budget: int, pool_size: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if budget > pool_size:
        raise ValueError(f"budget of {budget} labelled images is larger than the training pool "
                         f"of {pool_size} images")


def _seeded_choice(ids: list[str], count: int, entropy: list[int]) -> list[str]:
    """`count` ids drawn without replacement from sorted(ids), returned sorted."""
    if any(e < 0 for e in entropy):
        raise ValueError(f"seed, budget and draw must be non-negative, got {entropy}")
    pool = sorted(ids)
    rng = np.random.default_rng(entropy)
    chosen = rng.permutation(len(pool))[:count]
    return sorted(pool[i] for i in chosen)


def draw_budget(ids: Sequence[str], budget: int, draw: int, seed: int) -> list[str]:
    """Seeded random draw of `budget` ids (sorted), reproducible from (seed, budget, draw)."""
    pool = _pool(ids)
    _check_budget(budget, len(pool))
    return _seeded_choice(pool, int(budget), [int(seed), int(budget), int(draw)])


def first_n(ids: Sequence[str], budget: int) -> list[str]:
    """The original code's policy: the first `budget` ids in the order given."""
    pool = _pool(ids)
    _check_budget(budget, len(pool))
    return pool[:int(budget)]


def make_fewshot_split(train_ids: Sequence[str], cfg: FewShotConfig,
                       val_ids: Optional[Sequence[str]] = None) -> FewShotSplit:
    """Labelled training ids and validation ids from the training pool, per `cfg`; `val_ids`
    are the images of cfg.val_split for val_policy=split."""
    pool = _pool(train_ids)
    if not pool:
        raise ValueError("the training pool is empty: no images to draw a few-shot budget from")
    if cfg.val_count < 0:
        raise ValueError(f"val_count must be >= 0, got {cfg.val_count}")
    if cfg.policy not in ("random", "first_n"):
        raise ValueError(f"unknown few-shot policy {cfg.policy!r}; expected random or first_n")
    budget = cfg.budget
    # The validation generator depends on the budget too, so each (N, draw) stays independent.
    val_entropy = [int(cfg.seed), int(budget or 0), int(cfg.draw), _VAL_STREAM]
    n_val = cfg.val_count if cfg.val_policy not in ("none", "split") else 0

    if budget is None:
        if n_val and n_val >= len(pool):
            raise ValueError(f"val_count {n_val} leaves no training images in the pool of "
                             f"{len(pool)}")
        selected = list(pool)
        how = f"the whole pool of {len(pool)} images"
    elif cfg.policy == "random":
        selected = draw_budget(pool, budget, cfg.draw, cfg.seed)
        how = f"random draw {cfg.draw} of N={budget} from {len(pool)} images (seed {cfg.seed})"
    else:
        selected = first_n(pool, budget)
        how = f"first N={budget} of {len(pool)} images in the given order (original code)"

    if cfg.val_policy == "none":
        train, val = selected, []
        vhow = "no validation"
    elif cfg.val_policy == "fixed_count":
        if budget is None:
            val = _seeded_choice(pool, n_val, val_entropy)
            chosen = set(val)
            train = [i for i in pool if i not in chosen]
            vhow = f"validation: {n_val} images drawn (seed {cfg.seed}) from the pool"
        else:
            chosen = set(selected)
            rest = [i for i in pool if i not in chosen]
            if n_val > len(rest):
                raise ValueError(f"val_count {n_val} is larger than the {len(rest)} images left "
                                 f"after drawing N={budget} from {len(pool)}")
            train, val = selected, _seeded_choice(rest, n_val, val_entropy)
            vhow = f"validation: {n_val} images drawn from the {len(rest)} remaining"
    elif cfg.val_policy == "split":
        if not val_ids:
            raise ValueError(f"val_policy=split needs the images of val_split "
                             f"({cfg.val_split!r}); none given")
        shared = sorted(set(map(str, val_ids)) & set(pool))
        if shared:
            raise ValueError(f"val_split {cfg.val_split!r} shares {len(shared)} images with the "
                             f"training pool (e.g. {shared[:3]}): choose disjoint splits")
        train, val = selected, [str(i) for i in val_ids]
        vhow = f"validation: the {len(val)} images of split {cfg.val_split!r}"
    elif cfg.val_policy == "within_budget":
        n_sel = len(selected)
        if n_val >= n_sel:
            raise ValueError(f"within_budget validation: val_count {n_val} must be smaller than "
                             f"the budget N={n_sel}")
        val = _seeded_choice(selected, n_val, val_entropy)
        chosen = set(val)
        train = [i for i in selected if i not in chosen]
        vhow = f"validation: {n_val} of the N={n_sel} held out (total labelled stays {n_sel})"
    else:
        raise ValueError(f"unknown val_policy {cfg.val_policy!r}; "
                         f"expected fixed_count, within_budget, split or none")

    return FewShotSplit(train_ids=list(train), val_ids=list(val),
                        policy=f"{how}; {vhow} ({cfg.val_policy})",
                        seed=cfg.seed, draw=cfg.draw, budget=budget, selection=cfg.policy,
                        val_policy=cfg.val_policy, val_count=len(val), pool_size=len(pool))


def draw_calibration(pool_ids: Sequence[str], exclude: Sequence[str], count: Optional[int],
                     seed: int) -> list[str]:
    """Calibration images for conformal prediction regions: `count` ids (None = all) drawn
    with `seed` from the labelled pool without `exclude` (the run's few-shot training and
    validation images), sorted; reproducible from (seed, count) and independent of the
    budget draws. ValueError when the pool has fewer images left than asked for."""
    pool = _pool(pool_ids)
    excluded = set(str(i) for i in exclude)
    rest = [i for i in pool if i not in excluded]
    if not rest:
        raise ValueError(f"no labelled images left for calibration: all {len(pool)} images of "
                         f"the pool are few-shot training or validation images")
    if count is None:
        return sorted(rest)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"calibration count must be a positive integer, got {count!r}")
    if count > len(rest):
        raise ValueError(f"calibration count {count} is larger than the {len(rest)} images left "
                         f"in the pool of {len(pool)} after the few-shot train/validation images")
    return _seeded_choice(rest, int(count), [int(seed), int(count), _CALIBRATION_STREAM])
def dataset_fewshot_split(dataset, train_split: str, cfg: FewShotConfig):
    """(FewShotSplit, training pool, validation pool) of a LandmarkDataset: the pool is the
    split `train_split`; the validation images come from it too, or, for val_policy=split,
    from the split cfg.val_split. ValueError / DataError naming what is wrong."""
    pool = dataset.split(train_split)
    val_pool = pool
    if cfg.val_policy == "split":
        if not cfg.val_split:
            raise ValueError(f"val_policy=split needs fewshot.val_split (a split of "
                             f"{dataset.name}, e.g. released_val)")
        val_pool = dataset.split(cfg.val_split)
    return make_fewshot_split(pool.ids, cfg, val_pool.ids), pool, val_pool


def split_files(split: FewShotSplit) -> dict[str, str]:
    """{file name: text} of a split: split_train_ids.txt, split_val_ids.txt and split.json."""
    meta = {"policy": split.policy, "seed": split.seed, "draw": split.draw,
            "budget": split.budget, "selection": split.selection,
            "val_policy": split.val_policy, "val_count": split.val_count,
            "pool_size": split.pool_size, "num_train": len(split.train_ids),
            "num_val": len(split.val_ids)}
    return {"split_train_ids.txt": "".join(f"{i}\n" for i in split.train_ids),
            "split_val_ids.txt": "".join(f"{i}\n" for i in split.val_ids),
            "split.json": json.dumps(meta, indent=2) + "\n"}


def save_split(split: FewShotSplit, run_dir: str | Path) -> Path:
    """Write split_files(split) into `run_dir`; returns split.json's path."""
    run_dir = Path(run_dir)
    for name, text in split_files(split).items():
        atomic_write_text(run_dir / name, text)
    return run_dir / "split.json"


def load_split(run_dir: str | Path) -> FewShotSplit:
    """Read a split written by save_split; the id files must match the counts in split.json."""
    run_dir = Path(run_dir)
    path = run_dir / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"no split.json in {run_dir}")
    meta = json.loads(path.read_text())

    def read_ids(name: str) -> list[str]:
        text = (run_dir / name).read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]

    train, val = read_ids("split_train_ids.txt"), read_ids("split_val_ids.txt")
    if len(train) != meta["num_train"] or len(val) != meta["num_val"]:
        raise ValueError(f"{run_dir}: split files list {len(train)} train / {len(val)} val ids "
                         f"but split.json says {meta['num_train']} / {meta['num_val']}")
    return FewShotSplit(train_ids=train, val_ids=val, policy=meta["policy"], seed=meta["seed"],
                        draw=meta["draw"], budget=meta["budget"], selection=meta["selection"],
                        val_policy=meta["val_policy"], val_count=meta["val_count"],
                        pool_size=meta["pool_size"])
