"""Unbiased 1-bit uplinks and error feedback (models/wire/sign_quant.py): the stochastic
quantiser is unbiased and seeded, sign1 carries its output exactly, a device's residual is
kept between its participations through the real agent path, and the sign-delta options
learn over a real broker and are checked on both sides."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.private_store import PrivateStore
from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.task_checks import Refused, check_train_settings
from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.strategies import make_strategy
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.wire import decode_tensors
from fedge.models.wire.codecs import encode_tensors
from fedge.models.wire.sign_quant import quantise_change, stochastic_sign

MPT_TRAIN = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 2, "batch_size": 32}


def test_stochastic_signs_are_unbiased_and_seeded():
    x = np.random.default_rng(0).normal(size=2000).astype(np.float32)
    rng = np.random.default_rng(1)
    trials = np.stack([stochastic_sign(x, rng) for _ in range(400)])
    s = float(np.max(np.abs(x)))
    assert set(np.unique(np.abs(trials))) == {np.float32(s)}
    # mean of 400 draws: std of each element's mean <= s / sqrt(400) = s / 20; 5 sigma
    assert np.max(np.abs(trials.mean(0) - x)) < 5 * s / 20
    assert abs(float(trials.mean() - x.mean())) < 5 * s / np.sqrt(400 * 2000)  # unbiased overall
    a, _ = quantise_change({"w": x}, "stochastic", seed=7)
    b, _ = quantise_change({"w": x}, "stochastic", seed=7)
    c, _ = quantise_change({"w": x}, "stochastic", seed=8)
    assert np.array_equal(a["w"], b["w"]) and not np.array_equal(a["w"], c["w"])


def test_sign1_carries_stochastic_signs_exactly_and_residual_closes_the_books():
    rng = np.random.default_rng(2)
    change = {"a": rng.normal(size=(30, 7)).astype(np.float32), "b": np.zeros(5, np.float32)}
    residual = {"a": rng.normal(size=(30, 7)).astype(np.float32) * 0.1, "b": np.ones(5, np.float32)}
    for quantiser in ("stochastic", "deterministic"):
        sent, left = quantise_change(change, quantiser, seed=3, residual=residual)
        fields, body = encode_tensors(sent, "sign1")
        assert len(body) == 4 + (210 + 7) // 8 + 4 + 1  # per tensor: scale + bits
        decoded = decode_tensors(fields, body)
        if quantiser == "stochastic":
            assert all(np.array_equal(decoded[k], sent[k]) for k in sent)  # +-s goes through unchanged
        for k in change:  # change + old residual = what the hub rebuilds + new residual
            assert np.allclose(change[k] + residual[k], decoded[k] + left[k], atol=1e-6)


def test_bad_options_are_refused_on_both_sides():
    with pytest.raises(ConfigError, match="quantiser"):
        make_strategy("sign-delta", {"quantiser": "random"})
    with pytest.raises(ConfigError, match="server_lr"):
        make_strategy("sign-delta", {"server_lr": -1})
    profile = load_profile("sim")
    with pytest.raises(Refused, match="sign_quantiser"):
        check_train_settings({"sign_quantiser": "coin"}, profile, 10)
    with pytest.raises(Refused, match="error_feedback"):
        check_train_settings({"error_feedback": "yes"}, profile, 10)
    strategy = make_strategy("sign-delta", {"quantiser": "stochastic", "error_feedback": True})
    assert strategy.configure_train({"lr": 0.1}) == {"lr": 0.1, "sign_quantiser": "stochastic",
                                                     "error_feedback": True}
    assert make_strategy("sign-delta").configure_train({"lr": 0.1}) == {"lr": 0.1}  # old tasks unchanged


class RecordingStore(PrivateStore):
    """A real in-memory store that also remembers what it handed out and kept, per call."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[dict | None] = []
        self.saves: list[dict] = []

    def load(self, model):  # noqa: ANN001, ANN201
        out = super().load(model)
        self.loads.append(None if out is None else {k: v.copy() for k, v in out.items()})
        return out

    def save(self, model, tensors) -> None:  # noqa: ANN001
        self.saves.append({k: np.array(v) for k, v in tensors.items()})
        super().save(model, tensors)


def test_error_feedback_residual_is_kept_between_participations(embedded_broker, topic_prefix, tmp_path, small_data):
    """Through the fleet's agents and worker pool: each device's second round starts from the
    residual its first round left, and the residual really is what sign1 dropped (nonzero)."""
    hub = HubConfig(fleet="ef", prefix=topic_prefix, model="mlp-mpt", rounds=2, deadline_s=60,
                    strategy="sign-delta", strategy_options={"quantiser": "stochastic", "error_feedback": True},
                    train=dict(MPT_TRAIN, epochs=1))
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    with Fleet(cfg, dataset=small_data) as fleet:
        stores = []
        for agent in fleet.agents:
            agent.residual = RecordingStore()
            stores.append(agent.residual)
        report = fleet.run()
    assert report["rounds_completed"] == 2
    for store in stores:
        assert len(store.saves) == 2 and len(store.loads) == 2
        assert store.loads[0] is None  # first participation: no residual yet
        first = store.saves[0]
        assert set(first) and any(np.abs(v).max() > 0 for v in first.values())
        assert all(np.array_equal(store.loads[1][k], first[k]) for k in first)  # handed to round 2
        assert any(not np.array_equal(store.saves[1][k], first[k]) for k in first)  # and renewed


def test_sign_uplink_with_error_feedback_learns(embedded_broker, topic_prefix, tmp_path, small_data):
    hub = HubConfig(fleet="efl", prefix=topic_prefix, model="mlp-mpt", rounds=3, deadline_s=60,
                    strategy="sign-delta", strategy_options={"error_feedback": True}, train=dict(MPT_TRAIN))
    cfg = FleetConfig(devices=4, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    with Fleet(cfg, dataset=small_data) as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.3, report["final_accuracy"]  # chance 0.10
    assert report["uplink_bytes_per_device"] < 198_800 / 8 + 2048  # one bit per weight + scales + header
