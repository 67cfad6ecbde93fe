"""Per-item randomness: the augmentation of item i in epoch e is drawn from a generator seeded
by (seed, e, i), nothing else.

    class MyImages(ItemRandomness, Dataset):
        def __getitem__(self, index):
            return self.load(index, self.item_rng(index))

Why not one stream per DataLoader worker: a worker's stream depends on which items it happened
to serve before, so the same item is augmented differently with another worker count, and a
run resumed mid-epoch (which skips the batches already used) would not see the augmentations
the interrupted run would have seen. With per-item generators a resumed run replays its
augmentations bit for bit, and 0, 2 or 8 workers give the same batches. The process enters
through `seed` (the training scripts pass train.seed + a stride x process index), the engine
calls set_epoch before each epoch (set_data_epoch walks through wrapping datasets), and
`stream` separates independent uses of one item (e.g. curriculum stages).
"""
from __future__ import annotations

import numpy as np


class ItemRandomness:
    """Mixin: `seed`, `epoch`, set_epoch and item_rng(key)."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_rng(self, key: int, stream: int = 0) -> np.random.Generator:
        """The generator of item `key` in the current epoch (non-negative ints only)."""
        return np.random.default_rng([int(self.seed) % 2**63, self.epoch, int(key), stream])


def set_data_epoch(dataset, epoch: int) -> None:
    """Tell `dataset` and every dataset it wraps (`.dataset`, `.datasets`) the epoch."""
    stack = [dataset]
    while stack:
        item = stack.pop()
        if isinstance(item, ItemRandomness):
            item.set_epoch(epoch)
        inner = getattr(item, "dataset", None)
        if inner is not None:
            stack.append(inner)
        stack.extend(getattr(item, "datasets", None) or [])
