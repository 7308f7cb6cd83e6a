"""Pure helpers the strategies share: weighted mean, stacking, flattening, distances.

No strategy state and no configuration here, so every rule's arithmetic is visible in one
place and each strategy file only says how it combines these.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]
Update = tuple[State, int]


def require_updates(name: str, updates: Sequence[Update]) -> None:
    if not updates:
        raise ValueError(f"{name} needs at least one update")


def fedavg(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
    """McMahan et al.: average of the updates, weighted by their sample counts (float64 sums,
    float32 result), over the tensors of `global_state`."""
    require_updates("fedavg", updates)
    total = float(sum(n for _, n in updates))
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name in global_state:
        acc = np.zeros_like(global_state[name], dtype=np.float64)
        for tensors, n in updates:
            acc += np.asarray(tensors[name], dtype=np.float64) * (n / total)
        out[name] = acc.astype(np.float32)
    return out


def stack(name: str, updates: Sequence[Update]) -> np.ndarray:
    """One tensor of every update, stacked on a new first axis (float64)."""
    return np.stack([np.asarray(t[name], dtype=np.float64) for t, _ in updates])


def flat(tensors: State, names: Sequence[str]) -> np.ndarray:
    """All named tensors as one float64 vector."""
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in names])


def squared_distances(vectors: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances of the rows (clipped at 0 against rounding)."""
    sq = np.sum(vectors**2, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0.0)


def weight_change(old: State, new: State) -> float:
    """Relative L2 change of the global weights between rounds (paper 004's stop rule)."""
    num = sum(float(np.sum((np.asarray(new[k], np.float64) - old[k]) ** 2)) for k in old)
    den = sum(float(np.sum(np.asarray(old[k], np.float64) ** 2)) for k in old)
    return float(np.sqrt(num / max(den, 1e-12)))
