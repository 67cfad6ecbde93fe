"""The trivial predictor: the mean landmark configuration of the labelled images, on the model grid.

It ignores the image, so its error is the anatomical variability the dataset leaves to explain;
any learned detector has to beat it. It also exercises the whole geometric path: resize to the
model grid, average there, map back to each test image's original pixels.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


class MeanShapePredictor:
    def __init__(self) -> None:
        self.mean_: np.ndarray | None = None

    def fit(self, model_grid_landmarks: Iterable[np.ndarray]) -> "MeanShapePredictor":
        stack = np.stack(list(model_grid_landmarks))
        if stack.size == 0:
            raise ValueError("mean shape needs at least one labelled image")
        counts = np.isfinite(stack).all(axis=-1).sum(axis=0)
        if (counts == 0).any():
            raise ValueError(f"landmarks {np.flatnonzero(counts == 0).tolist()} are missing in "
                             "every labelled image: no mean to predict")
        self.mean_ = np.nanmean(stack, axis=0)
        return self

    def predict(self) -> np.ndarray:
        if self.mean_ is None:
            raise RuntimeError("call fit() first")
        return self.mean_.copy()
