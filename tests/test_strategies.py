"""Aggregation rules on hand-made updates whose right answer is known."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.store import RunStore
from fedge.hub.strategies import STRATEGIES, fedavg, make_strategy, weight_change
from fedge.hub.strategies.fedadam import FedAdam
from fedge.hub.strategies.fedavgm import FedAvgM
from fedge.hub.strategies.krum import Krum
from fedge.hub.strategies.median import Median
from fedge.models.errors import ConfigError
from fedge.models.wire.codecs import UPDATE_CARRIES


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
    out = make_strategy(rule)(G, honest + [attacker])
    assert np.all(np.abs(out["w"] - 1.0) < 0.1), out["w"]
    plain = fedavg(G, honest + [attacker])
    assert np.all(plain["w"] < -5)  # FedAvg is dragged away by the same attacker


def test_weight_change_is_relative_l2():
    assert weight_change(_u(1.0)[0], _u(1.5)[0]) == pytest.approx(0.5)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*fedavg"):
        make_strategy("average-ish")
    assert set(STRATEGIES) >= {"fedavg", "median", "trimmed-mean", "krum"}


# -- strategies as objects -----------------------------------------------------------------

def test_every_strategy_declares_an_uplink_the_device_reads_from_the_codec():
    for name in STRATEGIES:
        s = make_strategy(name)
        assert s.name == name
        assert UPDATE_CARRIES.get(s.codec or "", "state") == s.sends, name  # the device sends what s reads
        assert s.task_codec(None) == s.codec
    assert make_strategy("mpt-mask").task_codec(None) == "mask1" and make_strategy("sign-delta").codec == "sign1"
    with pytest.raises(ConfigError, match="needs update codec 'sign1', not 'fp16'"):
        make_strategy("sign-delta").task_codec("fp16")
    with pytest.raises(ConfigError, match="'mask1' sends a mask"):
        make_strategy("fedavg").task_codec("mask1")
    assert make_strategy("fedavgm").task_codec("fp16") == "fp16"


def test_options_reach_the_constructor_and_bad_ones_are_named():
    assert make_strategy("trimmed-mean", {"trim_fraction": 0.25}).trim_fraction == 0.25
    assert make_strategy("krum", {"byzantine": 2}).byzantine == 2
    with pytest.raises(ConfigError, match="strategy median has no option trim_fraction"):
        make_strategy("median", {"trim_fraction": 0.2})
    for name, options, bad in [("fedavgm", {"server_momentum": 1.0}, "server_momentum"),
                               ("fedavgm", {"server_lr": 0}, "server_lr"),
                               ("fedprox", {"proximal_mu": float("nan")}, "proximal_mu"),
                               ("trimmed-mean", {"trim_fraction": 0.5}, "trim_fraction"),
                               ("krum", {"byzantine": -1}, "byzantine"),
                               ("fedadam", {"beta2": 1.0}, "beta2")]:
        with pytest.raises(ConfigError, match=bad):
            make_strategy(name, options)
    with pytest.raises(ConfigError, match="server_momentum"):
        HubConfig(strategy="fedavg", strategy_options={"server_momentum": 0.9}).check()


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    ups = [_u(v) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    out = make_strategy("trimmed-mean", {"trim_fraction": 0.2})(G, ups)  # drops 0 and 100
    np.testing.assert_allclose(out["w"], 2.0)


def test_krum_is_a_wrapper_its_inner_rule_aggregates_the_chosen():
    ups = [_u(1.0, 1), _u(1.1, 1), _u(3.0, 9), _u(50.0, 1)]
    chosen = Krum(byzantine=1, keep=3).select(G, ups)
    assert sorted(float(t["w"][0, 0]) for t, _ in chosen) == pytest.approx([1.0, 1.1, 3.0])  # the outlier is out
    np.testing.assert_allclose(Krum(byzantine=1, keep=3)(G, ups)["w"], (1.0 + 1.1 + 27.0) / 11, rtol=1e-6)
    np.testing.assert_allclose(Krum(byzantine=1, keep=3, inner=Median())(G, ups)["w"], 1.1, rtol=1e-6)


def test_fedavgm_follows_the_momentum_formula():
    s = FedAvgM(server_lr=0.5, server_momentum=0.9)
    g1 = s(G, [_u(1.0, 1), _u(1.0, 3)])  # delta 1 -> m 1 -> 0 + 0.5 * 1
    np.testing.assert_allclose(g1["w"], 0.5)
    g2 = s(g1, [_u(2.5, 2)])  # delta 2 -> m 0.9 * 1 + 2 = 2.9 -> 0.5 + 0.5 * 2.9
    np.testing.assert_allclose(g2["w"], 1.95, rtol=1e-6)
    np.testing.assert_allclose(s.server_state()["momentum/w"], 2.9)
    plain = FedAvgM(server_lr=1.0, server_momentum=0.0)  # no momentum, unit step: FedAvg
    np.testing.assert_allclose(plain(G, [_u(1.0, 1), _u(4.0, 3)])["w"], fedavg(G, [_u(1.0, 1), _u(4.0, 3)])["w"])


def test_fedavgm_composes_with_a_robust_inner_rule():
    rng = np.random.default_rng(0)
    honest = [(OrderedDict(w=(1 + 0.01 * rng.normal(size=(2, 3))).astype(np.float32),
                           b=(1 + 0.01 * rng.normal(size=3)).astype(np.float32)), 10) for _ in range(9)]
    out = FedAvgM(server_lr=1.0, server_momentum=0.5, inner=Median())(G, honest + [_u(-100.0, 10)])
    assert np.all(np.abs(out["w"] - 1.0) < 0.1), out["w"]


def test_fedadam_follows_reddi_et_al():
    s = FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    g1 = s(G, [_u(1.0)])  # delta 1: m 0.1, v 0.01 -> 0.01 * 0.1 / (0.1 + 0.001)
    np.testing.assert_allclose(g1["w"], 0.01 * 0.1 / 0.101, rtol=1e-6)
    d = 1.0 - float(g1["w"][0, 0])
    m, v = 0.9 * 0.1 + 0.1 * d, 0.99 * 0.01 + 0.01 * d * d
    np.testing.assert_allclose(s(g1, [_u(1.0)])["w"], float(g1["w"][0, 0]) + 0.01 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_state_survives_the_run_store(tmp_path, name):
    """A strategy rebuilt from the stored state aggregates as the one that never stopped."""
    rounds = [[_u(1.0, 2), _u(2.0, 1)], [_u(0.5, 1)], [_u(3.0, 4), _u(-1.0, 1)]]
    straight, g = make_strategy(name), G
    for ups in rounds:
        g = straight(g, ups)
    first, h = make_strategy(name), G
    for ups in rounds[:2]:
        h = first(h, ups)
    store = RunStore(tmp_path / "run")
    store.save_checkpoint(2, b"model", server_state=first.server_state())
    resumed = make_strategy(name)
    resumed.load_server_state(store.load_server_state(2))
    h = resumed(h, rounds[2])
    assert all(np.array_equal(g[k], h[k]) for k in g)
    assert store.load_server_state(1) is None
    with pytest.raises(ConfigError, match="keeps no server state"):
        make_strategy("fedavg").load_server_state(first.server_state())


def test_fedprox_aggregates_as_fedavg_and_sends_mu_in_the_task():
    s = make_strategy("fedprox", {"proximal_mu": 0.05})
    assert s.configure_train({"lr": 0.1}) == {"lr": 0.1, "proximal_mu": 0.05}
    ups = [_u(1.0, 1), _u(4.0, 3)]
    assert np.array_equal(s(G, ups)["w"], fedavg(G, ups)["w"])
    assert FedAvgM(inner=s).configure_train({}) == {"proximal_mu": 0.05}  # a wrapper passes the task on


def test_design_doc_shows_the_real_code_of_its_example_strategy():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "design.md").read_text()
    shown = re.search(r"### How to add a strategy.*?```python\n(.*?)```", doc, flags=re.S).group(1)
    assert shown == (root / "hub" / "strategies" / "fedprox.py").read_text()
