"""Named splits beside the records' own (LandmarkDataset.derived_splits), added by the registry
after a reader has run:

    isbi2015       test            Test1 + Test2 (151-400), the released code's 250-image test
                                   set; an error naming the folder when Test2 is not there
                   released_train  001-130 \\  the released code's split of ISBI Train
                   released_val    131-150 /  (downstream_task/landmarks_datasets.py)
    hand_dha       released_train  the first 550 of the sorted labelled image ids
                   released_val    the next 59
                   released_test   the rest (301 when all 910 labelled DHA images are there)
    chest_gu2net   released_train  the first 195 of the sorted ids, after removing the 9 ids of
                   released_val    the next 34                  RELEASED_CHEST_EXCLUDED
                   released_test   the rest (41 of the 279 GU2Net labels)

The released rule is "sort the file names, take the first n": `first_n_splits`. A part that a
partial copy of the data cannot fill is not an empty split but a message (DataError when asked
for), saying how many images the rule needs.
"""
from __future__ import annotations

from typing import Sequence

from ddpm_landmarks.data.sample import LandmarkDataset

# downstream_task/landmarks_datasets.py (Chest.__init__): left out of every split, unexplained.
RELEASED_CHEST_EXCLUDED = ("CHNCXR_0059_0", "CHNCXR_0178_0", "CHNCXR_0228_0", "CHNCXR_0267_0",
                           "CHNCXR_0295_0", "CHNCXR_0310_0", "CHNCXR_0285_0", "CHNCXR_0276_0",
                           "CHNCXR_0303_0")
RELEASED_COUNTS = {"isbi2015": (("released_train", 130), ("released_val", 20)),
                   "hand_dha": (("released_train", 550), ("released_val", 59)),
                   "chest_gu2net": (("released_train", 195), ("released_val", 34))}
RELEASED_REST = {"hand_dha": "released_test", "chest_gu2net": "released_test"}
ISBI_TEST_PARTS = ("test1", "test2")


def first_n_splits(ids: Sequence[str], counts: Sequence[tuple[str, int]], rest: str = "",
                   exclude: Sequence[str] = ()) -> dict[str, list[str] | str]:
    """The released code's rule: sorted ids minus `exclude`, then `counts` consecutive parts
    (name, size) and, when `rest` is named, everything after them. A part the ids cannot fill
    completely is a message instead of a list (`rest` only needs one image)."""
    dropped = set(exclude)
    pool = sorted(i for i in ids if i not in dropped)
    out: dict[str, list[str] | str] = {}
    start = 0
    note = f" after removing {len(dropped)} excluded ids" if dropped else ""
    for name, size in counts:
        part = pool[start:start + size]
        out[name] = part if len(part) == size else (
            f"the released split takes sorted images {start + 1}-{start + size}{note}, but this "
            f"copy of the data has {len(pool)} images")
        start += size
    if rest:
        out[rest] = pool[start:] if len(pool) > start else (
            f"the released split tests on the sorted images after the first {start}{note}, but "
            f"this copy of the data has {len(pool)} images")
    return out


def add_isbi_splits(dataset: LandmarkDataset, root: str = "") -> LandmarkDataset:
    """ISBI 2015: "test" = test1 + test2, and the released code's split of Train."""
    by_split = {name: [r.id for r in dataset.records if r.split == name]
                for name in ("train",) + ISBI_TEST_PARTS}
    if all(by_split[p] for p in ISBI_TEST_PARTS):
        dataset.derived_splits["test"] = by_split["test1"] + by_split["test2"]
    else:
        absent = " and ".join(p for p in ISBI_TEST_PARTS if not by_split[p])
        dataset.derived_splits["test"] = (
            f"'test' is Test1 + Test2 (images 151-400, the released code's test set), but "
            f"{absent} is not in {root or 'this copy'}: score test1 (or test2) alone, or add "
            f"the challenge's Test2Data (RawImage/Test2Data, images 301-400)")
    released = first_n_splits(by_split["train"], RELEASED_COUNTS["isbi2015"])
    dataset.derived_splits.update(released)
    return dataset


def add_released_splits(dataset: LandmarkDataset) -> LandmarkDataset:
    """hand_dha / chest_gu2net: released_train / released_val / released_test (module doc)."""
    exclude = RELEASED_CHEST_EXCLUDED if dataset.name == "chest_gu2net" else ()
    dataset.derived_splits.update(first_n_splits(
        dataset.ids, RELEASED_COUNTS[dataset.name], RELEASED_REST[dataset.name], exclude))
    return dataset
