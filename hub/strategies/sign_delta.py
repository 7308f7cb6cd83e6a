"""1-bit uplink of the change (fedge's own): each update is a device's decoded delta,
scale * sign(trained - global) per tensor (codec sign1). The global moves by their
sample-weighted mean, i.e. FedAvg of the devices' states as the hub can rebuild them from one
bit per weight. Unlike a mask, the bits say which way every score moved, not only which
crossed the threshold. Moves any state (scores, weights, BatchNorm statistics).

Options (set in the task, read by the device: models/wire/sign_quant.py): `quantiser`
"stochastic" makes each device's 1-bit change unbiased (+-max|d|, E = d); `error_feedback`
makes each device keep what its quantisation dropped and add it to its next change; the
hub moves the global by `server_lr` times the mean decoded change."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedge.models.errors import ConfigError
from fedge.models.wire.sign_quant import QUANTISERS

from .base import Strategy
from .utils import State, Update, fedavg, require_updates


class SignDelta(Strategy):
    name = "sign-delta"
    sends = "sign"
    codec = "sign1"

    def __init__(self, quantiser: str = "deterministic", error_feedback: bool = False, server_lr: float = 1.0) -> None:
        if quantiser not in QUANTISERS:
            raise ConfigError(f"sign-delta: quantiser must be one of {', '.join(QUANTISERS)}, got {quantiser!r}")
        if not isinstance(error_feedback, bool):
            raise ConfigError(f"sign-delta: error_feedback must be true or false, got {error_feedback!r}")
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not math.isfinite(server_lr) \
                or server_lr <= 0:
            raise ConfigError(f"sign-delta: server_lr must be a finite number > 0, got {server_lr!r}")
        self.quantiser, self.error_feedback, self.server_lr = quantiser, error_feedback, float(server_lr)

    def configure_train(self, train: Mapping[str, Any]) -> dict[str, Any]:
        """Plain sign-delta tasks stay as they were; the options go to the devices when set."""
        out = dict(train)
        if self.quantiser != "deterministic":
            out["sign_quantiser"] = self.quantiser
        if self.error_feedback:
            out["error_feedback"] = True
        return out

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("sign-delta", updates)
        step = fedavg({k: np.zeros_like(v) for k, v in global_state.items()}, updates)
        return OrderedDict((k, (np.asarray(v, np.float64) + self.server_lr * step[k]).astype(np.float32))
                           for k, v in global_state.items())
