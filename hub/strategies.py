"""Aggregation rules: how a round's accepted updates become the next global model.

Every rule takes the current global tensors and a list of (tensors, num_samples) and
returns new global tensors; the hub, the fleet and the plain baseline loop all call here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]
Update = tuple[State, int]
Rule = Callable[[State, Sequence[Update]], "OrderedDict[str, np.ndarray]"]


def fedavg(global_state: State, updates: Sequence[Update]) -> "OrderedDict[str, np.ndarray]":
    """McMahan et al.: average of the devices' weights, weighted by their sample counts."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(n for _, n in updates))
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name in global_state:
        acc = np.zeros_like(global_state[name], dtype=np.float64)
        for tensors, n in updates:
            acc += np.asarray(tensors[name], dtype=np.float64) * (n / total)
        out[name] = acc.astype(np.float32)
    return out


STRATEGIES: dict[str, Rule] = {"fedavg": fedavg}


def get_strategy(name: str) -> Rule:
    if name not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def weight_change(old: State, new: State) -> float:
    """Relative L2 change of the global weights between rounds (paper 004's stop rule)."""
    num = sum(float(np.sum((np.asarray(new[k], np.float64) - old[k]) ** 2)) for k in old)
    den = sum(float(np.sum(np.asarray(old[k], np.float64) ** 2)) for k in old)
    return float(np.sqrt(num / max(den, 1e-12)))
