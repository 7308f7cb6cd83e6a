"""Aggregation rules: how a round's accepted updates become the next global model.

Every rule takes the current global tensors and a list of (tensors, num_samples) and
returns new global tensors; the hub, the fleet and the plain baseline loop all call here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedge.models.bits import SCORES_SUFFIX, keep_count, keep_probability, topk_mask
from fedge.models.errors import ConfigError

State = Mapping[str, np.ndarray]
Update = tuple[State, int]
Rule = Callable[[State, Sequence[Update]], "OrderedDict[str, np.ndarray]"]


def fedavg(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
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


def _stack(name: str, updates: Sequence[Update]) -> np.ndarray:
    return np.stack([np.asarray(t[name], dtype=np.float64) for t, _ in updates])


def coordinate_median(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
    """Yin et al. 2018: per-coordinate median; one lying device cannot move it far."""
    if not updates:
        raise ValueError("median needs at least one update")
    return OrderedDict((k, np.median(_stack(k, updates), axis=0).astype(np.float32)) for k in global_state)


def trimmed_mean(global_state: State, updates: Sequence[Update], trim: float = 0.1) -> OrderedDict[str, np.ndarray]:
    """Per coordinate, drop the ceil(trim*n) largest and smallest values, average the rest."""
    n = len(updates)
    if n == 0:
        raise ValueError("trimmed mean needs at least one update")
    cut = min(int(np.ceil(trim * n)), (n - 1) // 2)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for k in global_state:
        srt = np.sort(_stack(k, updates), axis=0)
        out[k] = srt[cut : n - cut].mean(axis=0).astype(np.float32)
    return out


def _flat(tensors: State, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in names])


def multi_krum(global_state: State, updates: Sequence[Update], byzantine: int = 1, keep: int | None = None
               ) -> OrderedDict[str, np.ndarray]:
    """Blanchard et al. 2017: score each update by the squared distances to its n-f-2 nearest
    neighbours; average (FedAvg-weighted) the `keep` best-scored (keep=1 is plain Krum)."""
    n = len(updates)
    if n == 0:
        raise ValueError("krum needs at least one update")
    names = list(global_state)
    flats = np.stack([_flat(t, names) for t, _ in updates])
    sq = np.sum(flats**2, axis=1)
    dists = np.maximum(sq[:, None] + sq[None, :] - 2 * flats @ flats.T, 0.0)
    neighbours = max(1, n - byzantine - 2)
    scores = [np.sort(np.delete(dists[i], i))[:neighbours].sum() if n > 1 else 0.0 for i in range(n)]
    keep = keep or max(1, n - byzantine)
    chosen = [updates[i] for i in np.argsort(scores)[:keep]]
    return fedavg(global_state, chosen)


def krum(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
    return multi_krum(global_state, updates, byzantine=1, keep=1)


def mpt_score_avg(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
    """Paper 003's MPT-FL: the state of an MPT model is its pruning scores, so FedAvg of the
    states is the sample-weighted average of the scores."""
    return fedavg(global_state, updates)


def mpt_mask(global_state: State, updates: Sequence[Update], step: float = 0.5) -> OrderedDict[str, np.ndarray]:
    """1-bit uplink: each update is a device's 0/1 mask. Per weight, p = the sample-weighted
    share of devices keeping it and g = whether the current global mask keeps it; the score's
    magnitude moves by step * std(|scores|) * (p - g): weights the devices added rise, weights
    they dropped sink, and a layer's score scale is preserved. (Turning p directly into scores
    discarded the scores' accumulated information and did not learn on non-IID shards.)"""

    if not updates:
        raise ValueError("mpt-mask needs at least one update")
    keep = keep_probability([t for t, _ in updates], [n for _, n in updates])
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, prev in global_state.items():
        prev = np.asarray(prev, dtype=np.float32)
        magnitude = np.abs(prev)
        kept = int(round(float(np.mean([np.sum(np.asarray(t[name]) != 0) for t, _ in updates]))))
        kept = kept if kept > 0 else keep_count(prev.size, 0.8)
        current = topk_mask(magnitude, kept).astype(np.float32)
        moved = np.maximum(magnitude + step * float(np.std(magnitude)) * (keep[name] - current), 0.0)
        out[name] = (np.where(prev < 0, -1.0, 1.0) * moved).astype(np.float32)
    return out


def sign_delta(global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
    """1-bit uplink of the change: each update is a device's decoded delta, scale * sign(trained -
    global) per tensor (codec sign1). The global moves by their sample-weighted mean, i.e.
    FedAvg of the devices' states as the hub can rebuild them from one bit per weight. Unlike
    a mask, the bits say which way every score moved, not only which crossed the threshold."""
    if not updates:
        raise ValueError("sign-delta needs at least one update")
    step = fedavg({k: np.zeros_like(v) for k, v in global_state.items()}, updates)
    return OrderedDict((k, (np.asarray(v, np.float64) + step[k]).astype(np.float32)) for k, v in global_state.items())


# update codec each strategy needs from devices (None: the device's profile decides)
UPDATE_CODEC: dict[str, str] = {"mpt-mask": "mask1", "sign-delta": "sign1"}
# codecs whose updates mean something else than a state: an update in another codec is refused
ONE_BIT_CODECS = frozenset(UPDATE_CODEC.values())

STRATEGIES: dict[str, Rule] = {
    "mpt-score-avg": mpt_score_avg,
    "mpt-mask": mpt_mask,
    "sign-delta": sign_delta,
    "fedavg": fedavg,
    "median": coordinate_median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
}


def check_strategy_fits(strategy: str, model: str, state: State) -> None:
    """Fail at start, not in every round: mpt-mask updates are masks only, so every tensor of
    the model's state must be a supermask score (named '*.scores'). A 1/1 MPT model also
    carries BatchNorm running statistics that a mask cannot carry; a dense model has no scores."""
    if UPDATE_CODEC.get(strategy) != "mask1":
        return

    others = [k for k in state if not k.endswith(SCORES_SUFFIX)]
    if len(others) == len(state):
        raise ConfigError(f"strategy {strategy} needs a supermask model (conv4-mpt, mlp-mpt, ...); "
                         f"model {model!r} has no pruning scores")
    if others:
        raise ConfigError(f"strategy {strategy} uploads only masks, but model {model!r} also has other state "
                         f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); use sign-delta or "
                         f"mpt-score-avg for it")


def get_strategy(name: str) -> Rule:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def weight_change(old: State, new: State) -> float:
    """Relative L2 change of the global weights between rounds (paper 004's stop rule)."""
    num = sum(float(np.sum((np.asarray(new[k], np.float64) - old[k]) ** 2)) for k in old)
    den = sum(float(np.sum(np.asarray(old[k], np.float64) ** 2)) for k in old)
    return float(np.sqrt(num / max(den, 1e-12)))
