"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ceil(trim*n)
largest and smallest values and average the rest (unweighted).

Not a wrapper, for the reason median.py gives: which values are dropped differs per
coordinate, so it cannot hand a subset of whole updates to an inner rule."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from fedge.models.errors import ConfigError

from .base import Strategy
from .utils import State, Update, require_updates, stack


class TrimmedMean(Strategy):
    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)) \
                or not 0 <= trim_fraction < 0.5:
            raise ConfigError(f"trimmed-mean: trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("trimmed mean", updates)
        n = len(updates)
        cut = min(int(np.ceil(self.trim_fraction * n)), (n - 1) // 2)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k in global_state:
            srt = np.sort(stack(k, updates), axis=0)
            out[k] = srt[cut : n - cut].mean(axis=0).astype(np.float32)
        return out
