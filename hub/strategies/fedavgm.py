"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum. With the pseudo-gradient
delta = inner(updates) - global, the server keeps m <- momentum * m + delta and moves the
global by server_lr * m. momentum 0 and server_lr 1 is the inner rule itself; the step is
about server_lr / (1 - momentum) times delta once m has built up."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.models.errors import ConfigError

from .base import ServerOptimizer, Strategy
from .fedavg import FedAvg


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, inner: Strategy | None = None) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not 0 < server_lr < float("inf"):
            raise ConfigError(f"fedavgm: server_lr must be a finite number > 0, got {server_lr!r}")
        if isinstance(server_momentum, bool) or not isinstance(server_momentum, (int, float)) \
                or not 0 <= server_momentum < 1:
            raise ConfigError(f"fedavgm: server_momentum must be in [0, 1), got {server_momentum!r}")
        super().__init__(inner or FedAvg())
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)

    def step(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        old = self.slots.get("momentum", {})
        momentum = {k: self.server_momentum * old[k] + d if k in old else d.copy() for k, d in delta.items()}
        self.slots = {"momentum": momentum}
        return {k: self.server_lr * m for k, m in momentum.items()}
