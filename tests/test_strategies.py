"""Aggregation rules on hand-made updates whose right answer is known."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedge.hub.strategies import STRATEGIES, fedavg, get_strategy, weight_change


def _u(value: float, n: int = 1):
    return OrderedDict(w=np.full((2, 3), value, np.float32), b=np.full((3,), value, np.float32)), n


G = _u(0.0)[0]


def test_fedavg_weights_by_samples():
    out = fedavg(G, [_u(1.0, 1), _u(4.0, 3)])
    np.testing.assert_allclose(out["w"], 3.25)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_rules_ignore_one_scaled_attacker_in_ten(rule):
    rng = np.random.default_rng(0)
    honest = [(OrderedDict(w=(1 + 0.01 * rng.normal(size=(2, 3))).astype(np.float32),
                           b=(1 + 0.01 * rng.normal(size=3)).astype(np.float32)), 10) for _ in range(9)]
    attacker = _u(-100.0, 10)
    out = get_strategy(rule)(G, honest + [attacker])
    assert np.all(np.abs(out["w"] - 1.0) < 0.1), out["w"]
    plain = fedavg(G, honest + [attacker])
    assert np.all(plain["w"] < -5)  # FedAvg is dragged away by the same attacker


def test_weight_change_is_relative_l2():
    assert weight_change(_u(1.0)[0], _u(1.5)[0]) == pytest.approx(0.5)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*fedavg"):
        get_strategy("average-ish")
    assert set(STRATEGIES) >= {"fedavg", "median", "trimmed-mean", "krum"}
