"""FedProx (Li et al. 2020): each device minimises its loss plus mu/2 ||w - w_global||^2, which
keeps local models near the global one on non-IID data. The hub's side is FedAvg; mu travels
in the task's `train` settings (`proximal_mu`) and the device's trainer adds the term
(edge_agent/trainer.py), so mu = 0 trains exactly as FedAvg does."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedge.models.errors import ConfigError

from .fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) \
                or not math.isfinite(proximal_mu) or proximal_mu < 0:
            raise ConfigError(f"fedprox: proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        self.proximal_mu = float(proximal_mu)

    def configure_train(self, train: Mapping[str, Any]) -> dict[str, Any]:
        return {**train, "proximal_mu": self.proximal_mu}
