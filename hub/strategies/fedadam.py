"""FedAdam (Reddi et al. 2020, "Adaptive Federated Optimization", Algorithm 2): Adam on the
server over the pseudo-gradient delta = inner(updates) - global, without bias correction:
m <- b1 m + (1 - b1) delta; v <- b2 v + (1 - b2) delta^2; global += server_lr m / (sqrt(v) + tau).
tau bounds the step where v is tiny; each coordinate moves about server_lr per round."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedge.models.errors import ConfigError

from .base import ServerOptimizer, Strategy
from .fedavg import FedAvg


def _in(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value < high
    if not ok:
        raise ConfigError(f"fedadam: {name} must be in {'(' if low_open else '['}{low:g}, {high:g}), got {value!r}")
    return float(value)


class FedAdam(ServerOptimizer):
    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 inner: Strategy | None = None) -> None:
        self.server_lr = _in("server_lr", server_lr, 0, math.inf, low_open=True)
        self.beta1 = _in("beta1", beta1, 0, 1)
        self.beta2 = _in("beta2", beta2, 0, 1)
        self.tau = _in("tau", tau, 0, math.inf, low_open=True)
        super().__init__(inner or FedAvg())

    def step(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m_old, v_old = self.slots.get("m", {}), self.slots.get("v", {})
        m = {k: self.beta1 * m_old.get(k, 0.0) + (1 - self.beta1) * d for k, d in delta.items()}
        v = {k: self.beta2 * v_old.get(k, 0.0) + (1 - self.beta2) * d * d for k, d in delta.items()}
        self.slots = {"m": m, "v": v}
        return {k: self.server_lr * m[k] / (np.sqrt(v[k]) + self.tau) for k in delta}
