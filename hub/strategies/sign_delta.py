"""1-bit uplink of the change (fedge's own): each update is a device's decoded delta,
scale * sign(trained - global) per tensor (codec sign1). The global moves by their
sample-weighted mean, i.e. FedAvg of the devices' states as the hub can rebuild them from one
bit per weight. Unlike a mask, the bits say which way every score moved, not only which
crossed the threshold. Moves any state (scores, weights, BatchNorm statistics)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .base import Strategy
from .utils import State, Update, fedavg, require_updates


class SignDelta(Strategy):
    name = "sign-delta"
    sends = "sign"
    codec = "sign1"

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("sign-delta", updates)
        step = fedavg({k: np.zeros_like(v) for k, v in global_state.items()}, updates)
        return OrderedDict((k, (np.asarray(v, np.float64) + step[k]).astype(np.float32))
                           for k, v in global_state.items())
