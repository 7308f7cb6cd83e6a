"""MPT with a 1-bit mask uplink: each update is a device's 0/1 mask (codec mask1).

Per weight, p = the sample-weighted share of devices keeping it and g = whether the current
global mask keeps it; the score's magnitude moves by step * std(|scores|) * (p - g): weights
the devices added rise, weights they dropped sink, and a layer's score scale is preserved.
(Turning p directly into scores discarded the scores' accumulated information and did not
learn on non-IID shards.)"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from fedge.models.bits import SCORES_SUFFIX, keep_count, keep_probability, topk_mask
from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec

from .base import Strategy
from .utils import State, Update, require_updates


class MptMask(Strategy):
    name = "mpt-mask"
    sends = "mask"
    codec = "mask1"

    def __init__(self, step: float = 0.5) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ConfigError(f"mpt-mask: step must be a positive number, got {step!r}")
        self.step = float(step)

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("mpt-mask", updates)
        keep = keep_probability([t for t, _ in updates], [n for _, n in updates])
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, prev in global_state.items():
            prev = np.asarray(prev, dtype=np.float32)
            magnitude = np.abs(prev)
            kept = int(round(float(np.mean([np.sum(np.asarray(t[name]) != 0) for t, _ in updates]))))
            kept = kept if kept > 0 else keep_count(prev.size, 0.8)
            current = topk_mask(magnitude, kept).astype(np.float32)
            moved = np.maximum(magnitude + self.step * float(np.std(magnitude)) * (keep[name] - current), 0.0)
            out[name] = (np.where(prev < 0, -1.0, 1.0) * moved).astype(np.float32)
        return out

    def check_fits(self, model: ModelSpec, state: State) -> None:
        """A mask carries only supermask scores ('*.scores'): a dense model has none, and a 1/1
        MPT model's BatchNorm statistics could never be updated."""
        others = [k for k in state if not k.endswith(SCORES_SUFFIX)]
        if len(others) == len(state):
            raise ConfigError(f"strategy {self.name} needs a supermask model (conv4-mpt, mlp-mpt, ...); "
                              f"model {model} has no pruning scores")
        if others:
            raise ConfigError(f"strategy {self.name} uploads only masks, but model {model} also has other state "
                              f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); use sign-delta or "
                              f"mpt-score-avg for it")
