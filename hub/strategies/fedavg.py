"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the devices' trained states."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .base import Strategy
from .utils import State, Update, fedavg


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        return fedavg(global_state, updates)
