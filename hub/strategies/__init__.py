"""Aggregation strategies: how a round's accepted updates become the next global model.

One file per algorithm, each a `Strategy` (base.py) built from a name and its options
(`make_strategy`, or `HubConfig.make_strategy()` for a run). docs/design.md, "How to add a
strategy", walks through one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from fedge.models.errors import ConfigError
from fedge.models.wire.codecs import UPDATE_CARRIES

from .base import Strategy
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedpm import FedPM
from .fedprox import FedProx
from .krum import Krum, MultiKrum
from .median import Median
from .mpt_mask import MptMask
from .mpt_score_avg import MptScoreAvg
from .sign_delta import SignDelta
from .trimmed_mean import TrimmedMean
from .utils import State, Update, fedavg, weight_change

__all__ = ["STRATEGIES", "Strategy", "State", "Update", "make_strategy", "weight_change", "fedavg", "ONE_BIT_CODECS",
           "option_names"]

# name -> class; the name is what --strategy and HubConfig.strategy take
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    MptScoreAvg, MptMask, SignDelta, FedAvg, Median, TrimmedMean, Krum, MultiKrum, FedAvgM, FedAdam, FedProx, FedPM)}

# codecs whose updates mean something else than a state: an update in another codec is refused
ONE_BIT_CODECS = frozenset(UPDATE_CARRIES)


def option_names(name: str) -> list[str]:
    """The options (constructor parameters) strategy `name` takes from a run's settings."""
    params = inspect.signature(STRATEGIES[name]).parameters
    return [p for p in params if p != "inner"]


def make_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """Strategy `name` built with `options`; ConfigError naming an unknown name or option."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(option_names(name)))
    if unknown:
        takes = ", ".join(option_names(name)) or "none"
        raise ConfigError(f"strategy {name} has no option {', '.join(unknown)} (its options: {takes})")
    return STRATEGIES[name](**options)

