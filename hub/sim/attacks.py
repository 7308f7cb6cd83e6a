"""Lying devices for the simulator: how a poisoned update is made from an honest one.

Used by the poisoning benchmark and tests to measure what robust aggregation buys; a real
agent never loads this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

Tamper = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], "OrderedDict[str, np.ndarray]"]


def scaled(factor: float = 10.0) -> Tamper:
    """Boost the device's change by `factor` (model-replacement style)."""
    def tamper(global_state, local_state):  # noqa: ANN001, ANN202
        return OrderedDict((k, (global_state[k] + factor * (local_state[k] - global_state[k])).astype(np.float32))
                           for k in local_state)
    return tamper


def sign_flip(factor: float = 4.0) -> Tamper:
    """Send the opposite of the honest change, amplified: pushes the model uphill."""
    def tamper(global_state, local_state):  # noqa: ANN001, ANN202
        return OrderedDict((k, (global_state[k] - factor * (local_state[k] - global_state[k])).astype(np.float32))
                           for k in local_state)
    return tamper


ATTACKS: dict[str, Callable[[], Tamper]] = {"scaled": scaled, "sign-flip": sign_flip}
