"""Few-shot budgets: seeded draws, validation policies, saving and loading."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ddpm_landmarks.config.common import FewShotConfig
from ddpm_landmarks.data.splits import (
    FewShotSplit,
    draw_budget,
    draw_calibration,
    first_n,
    load_split,
    make_fewshot_split,
    save_split,
)

POOL = [f"{i:03d}" for i in range(1, 151)]      # ISBI Train 001-150


def test_draw_is_reproducible_and_draws_differ():
    a = draw_budget(POOL, 10, draw=0, seed=0)
    assert a == draw_budget(POOL, 10, draw=0, seed=0)
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(POOL)
    assert a != draw_budget(POOL, 10, draw=1, seed=0)
    assert a != draw_budget(POOL, 10, draw=0, seed=1)
    assert a != POOL[:10]                        # not the first N


def test_draw_is_independent_of_input_order():
    shuffled = POOL[::-1][75:] + POOL[::-1][:75]
    assert draw_budget(shuffled, 25, 3, 7) == draw_budget(POOL, 25, 3, 7)


def test_draws_are_independent_per_budget_and_draw():
    # Each (seed, N, draw) is its own generator: computing other draws first changes nothing.
    direct = draw_budget(POOL, 5, 2, 0)
    for n in (1, 5, 10, 50):
        for d in range(3):
            draw_budget(POOL, n, d, 0)
    assert draw_budget(POOL, 5, 2, 0) == direct


def test_first_n_is_the_original_policy():
    assert first_n(POOL, 10) == POOL[:10]
    assert first_n(POOL[::-1], 3) == POOL[::-1][:3]      # order as given, not sorted


def test_budget_errors():
    with pytest.raises(ValueError, match=r"200.*150"):
        draw_budget(POOL, 200, 0, 0)
    with pytest.raises(ValueError, match=r"200.*150"):
        first_n(POOL, 200)
    with pytest.raises(ValueError, match="positive"):
        draw_budget(POOL, 0, 0, 0)
    with pytest.raises(ValueError, match="duplicate"):
        draw_budget(POOL + ["001"], 5, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        draw_budget(POOL, 5, -1, 0)


def test_fixed_count_validation():
    cfg = FewShotConfig(budget=10, draw=1, seed=3, val_policy="fixed_count", val_count=10)
    split = make_fewshot_split(POOL, cfg)
    assert split.train_ids == draw_budget(POOL, 10, 1, 3)     # the N are exactly the draw
    assert len(split.val_ids) == 10
    assert not set(split.train_ids) & set(split.val_ids)
    assert set(split.val_ids) <= set(POOL)
    assert split == make_fewshot_split(list(reversed(POOL)), cfg)
    assert "fixed_count" in split.policy


def test_within_budget_validation_is_nested_in_the_draw():
    cfg = FewShotConfig(budget=10, draw=0, seed=0, val_policy="within_budget", val_count=3)
    split = make_fewshot_split(POOL, cfg)
    drawn = set(draw_budget(POOL, 10, 0, 0))
    assert len(split.train_ids) == 7 and len(split.val_ids) == 3
    assert set(split.train_ids) | set(split.val_ids) == drawn   # total labelled stays N
    assert not set(split.train_ids) & set(split.val_ids)
    with pytest.raises(ValueError, match="smaller than"):
        make_fewshot_split(POOL, FewShotConfig(budget=3, val_policy="within_budget",
                                               val_count=3))


def test_none_validation_and_whole_pool():
    split = make_fewshot_split(POOL, FewShotConfig(budget=5, val_policy="none"))
    assert split.val_ids == [] and len(split.train_ids) == 5
    whole = make_fewshot_split(POOL, FewShotConfig(budget=None, val_policy="none"))
    assert sorted(whole.train_ids) == POOL
    whole = make_fewshot_split(POOL, FewShotConfig(budget=None, val_policy="fixed_count",
                                                   val_count=10))
    assert len(whole.val_ids) == 10 and len(whole.train_ids) == 140
    assert set(whole.train_ids) | set(whole.val_ids) == set(POOL)
    assert not set(whole.train_ids) & set(whole.val_ids)


def test_first_n_policy_in_split():
    cfg = FewShotConfig(budget=10, policy="first_n", val_policy="fixed_count", val_count=5)
    split = make_fewshot_split(POOL, cfg)
    assert split.train_ids == POOL[:10]
    assert not set(split.val_ids) & set(POOL[:10]) and len(split.val_ids) == 5


def test_split_errors():
    with pytest.raises(ValueError, match=r"200.*150"):
        make_fewshot_split(POOL, FewShotConfig(budget=200))
    with pytest.raises(ValueError, match="larger than"):
        make_fewshot_split(POOL[:12], FewShotConfig(budget=10, val_count=5))
    with pytest.raises(ValueError, match="empty"):
        make_fewshot_split([], FewShotConfig())


def test_save_load_round_trip(tmp_path):
    split = make_fewshot_split(POOL, FewShotConfig(budget=25, draw=2, seed=5, val_count=10))
    save_split(split, tmp_path)
    assert (tmp_path / "split_train_ids.txt").read_text().splitlines() == split.train_ids
    assert (tmp_path / "split_val_ids.txt").read_text().splitlines() == split.val_ids
    meta = json.loads((tmp_path / "split.json").read_text())
    assert (meta["seed"], meta["draw"], meta["budget"]) == (5, 2, 25)
    assert meta["policy"] == split.policy and meta["val_policy"] == "fixed_count"
    loaded = load_split(tmp_path)
    assert isinstance(loaded, FewShotSplit) and loaded == split
    # A hand-edited id file that no longer matches split.json is refused.
    (tmp_path / "split_val_ids.txt").write_text("001\n")
    with pytest.raises(ValueError, match="split.json"):
        load_split(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "nowhere")


def test_calibration_draw_avoids_the_split_and_is_seeded():
    """ISBI-like: 50 labels + 10 validation images leave 90 for calibration."""
    split = make_fewshot_split(POOL, FewShotConfig(budget=50, val_count=10))
    seen = split.train_ids + split.val_ids
    every = draw_calibration(POOL, seen, None, seed=0)
    assert every == sorted(set(POOL) - set(seen)) and len(every) == 90
    a = draw_calibration(POOL, seen, 40, seed=0)
    assert len(a) == 40 and set(a) <= set(every) and a == sorted(a)
    assert a == draw_calibration(list(reversed(POOL)), seen, 40, seed=0)   # order-free
    assert a != draw_calibration(POOL, seen, 40, seed=1)
    # Not the budget generator of the same seed: another stream.
    assert a != draw_budget(every, 40, draw=0, seed=0)
    with pytest.raises(ValueError, match="91 is larger than the 90"):
        draw_calibration(POOL, seen, 91, seed=0)
    with pytest.raises(ValueError, match="no labelled images left"):
        draw_calibration(POOL[:60], POOL[:60], None, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        draw_calibration(POOL, seen, 0, seed=0)
def test_val_policy_split_takes_another_split_and_refuses_overlap():
    pool = [f"{i:03d}" for i in range(1, 131)]
    val = [f"{i:03d}" for i in range(131, 151)]
    cfg = FewShotConfig(budget=5, policy="first_n", val_policy="split", val_split="released_val")
    split = make_fewshot_split(pool, cfg, val)
    assert split.train_ids == pool[:5] and split.val_ids == val and split.val_count == 20
    assert "the 20 images of split 'released_val'" in split.policy
    whole = make_fewshot_split(pool, dataclasses.replace(cfg, budget=None), val)
    assert whole.train_ids == pool                     # N = all: nothing held out of the pool
    with pytest.raises(ValueError, match="shares 1 images with the training pool"):
        make_fewshot_split(pool, cfg, val + ["001"])
    with pytest.raises(ValueError, match="needs the images of val_split"):
        make_fewshot_split(pool, cfg)
