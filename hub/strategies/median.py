"""Coordinate-wise median (Yin et al. 2018): one lying device cannot move it far.

Not a wrapper: it replaces the mean itself with a per-coordinate statistic over all updates,
so there is no inner rule for it to feed; it can be the inner rule of one (Krum, FedAvgM)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .base import Strategy
from .utils import State, Update, require_updates, stack


class Median(Strategy):
    name = "median"

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("median", updates)
        return OrderedDict((k, np.median(stack(k, updates), axis=0).astype(np.float32)) for k in global_state)
