"""Krum and multi-Krum (Blanchard et al. 2017), as a wrapper: score each update by the squared
distances to its n-f-2 nearest neighbours, keep the `keep` best-scored whole updates, and let
the inner rule (FedAvg unless told) aggregate those. keep=1 is Krum; keep=None keeps n-f."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from fedge.models.errors import ConfigError

from .base import Strategy
from .fedavg import FedAvg
from .utils import State, Update, flat, require_updates, squared_distances


class Krum(Strategy):
    name = "krum"

    def __init__(self, byzantine: int = 1, keep: int | None = 1, inner: Strategy | None = None) -> None:
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ConfigError(f"krum: byzantine (f, devices that may lie) must be an integer >= 0, got {byzantine!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"krum: keep must be a positive integer or None (n - f), got {keep!r}")
        self.byzantine = byzantine
        self.keep = keep
        self.inner = inner or FedAvg()
        if self.inner.sends != "state":
            raise ConfigError(f"krum compares whole states; it cannot wrap {self.inner.name}")

    def select(self, global_state: State, updates: Sequence[Update]) -> list[Update]:
        """The updates Krum trusts, best score first."""
        require_updates("krum", updates)
        n = len(updates)
        names = list(global_state)
        dists = squared_distances(np.stack([flat(t, names) for t, _ in updates]))
        neighbours = max(1, n - self.byzantine - 2)
        scores = [np.sort(np.delete(dists[i], i))[:neighbours].sum() if n > 1 else 0.0 for i in range(n)]
        keep = self.keep or max(1, n - self.byzantine)
        return [updates[i] for i in np.argsort(scores)[:keep]]

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        return self.inner.aggregate(global_state, self.select(global_state, updates))


class MultiKrum(Krum):
    """Multi-Krum: by default keeps the n - f best-scored updates."""

    name = "multi-krum"

    def __init__(self, byzantine: int = 1, keep: int | None = None, inner: Strategy | None = None) -> None:
        super().__init__(byzantine=byzantine, keep=keep, inner=inner)
