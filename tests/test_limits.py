# ruff: noqa: F811
"""Limits that hold even inside a locked-down fleet (passwords, the `fedge acl` ACL, signed
models and tasks, per-device keys), over the private Mosquitto of tests/test_tls_acl.py:

- the hub weighs an update by at most what its device announced when it joined and by
  max_samples: an enrolled device claiming 10^9 samples for an all-zero model is rejected,
  stored, and the run still learns;
- a device refuses what a buggy or compromised (but signed) hub asks: NaN weights, lr NaN,
  batch -5, epochs -1 or 10^6, training past its time budget; it logs why and says it in its
  status, which the hub logs;
- an agent without the hub's public key warns at start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest

from fedge.cli import main
from fedge.models.wire import Topics, decode
from fedge.models.wire.keys import HUB_PUBLIC, hub_signer, hub_verifier, read_device_key
from fedge.models.wire.messages import (
    TaskMessage,
    build_model_message,
    build_task_message,
    build_update_message,
    parse_task,
    status_payload,
)

# the private Mosquitto with TLS, passwords and the `fedge acl` ACL: test_tls_acl's own fixtures
# (imported here, so a test's parameters of the same names are redefinitions: F811 is expected)
from .inbox import Inbox
from .test_tls_acl import DEVICES, FLEET, HUB_USER, _cfg, _link, pki, secure_broker  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_mosquitto_tools")

INFLATED = 10**9


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    assert main(["keys", "init", "--dir", str(folder)]) == 0
    assert main(["keys", "enroll", *DEVICES, "--dir", str(folder)]) == 0
    return folder


def _agent(pki, broker, topics, data, num_classes, pool, keys, device="dev-a", verified=True, **profile_kw):
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.profile import load_profile

    profile = dataclasses.replace(load_profile("sim"), model="mlp", **profile_kw)
    return Agent(device, profile, _cfg(pki, broker, device), topics, data, num_classes, pool,
                 hub_verifier=hub_verifier(keys / HUB_PUBLIC) if verified else None,
                 device_key=read_device_key(keys / "devices" / f"{device}.key"))


# ----------------------------------------------------------------------------- hub: item 4
@pytest.mark.parametrize("announced", [800, INFLATED], ids=["claims-above-announced", "announces-above-max"])
def test_an_inflated_sample_count_is_rejected_and_the_run_still_learns(pki, secure_broker, topic_prefix, small_data,
                                                                      keys, tmp_path, caplog, announced):
    from fedge.edge_agent.pool import TrainingPool
    from fedge.hub.config import HubConfig
    from fedge.hub.hub import Hub
    from fedge.hub.store import RunStore

    hub_cfg = HubConfig(fleet=FLEET, prefix=topic_prefix, model="mlp", rounds=2, min_devices=2, deadline_s=4,
                        wait_devices_s=30, train={"lr": 0.05, "batch_size": 32}, keys_dir=str(keys),
                        in_shape=small_data.in_shape, num_classes=small_data.num_classes)
    hub = Hub(hub_cfg, _cfg(pki, secure_broker, HUB_USER), RunStore(tmp_path / "runs" / "inflated"),
              small_data.test.x, small_data.test.y)
    initial_acc = hub.metrics(hub.global_state)["accuracy"]
    topics = Topics(FLEET, topic_prefix)
    honest_idx = np.arange(len(small_data.train.y))[::2]
    pool = TrainingPool(workers=1, threads_per_worker=1)
    honest = _agent(pki, secure_broker, topics, small_data.train.subset(honest_idx), small_data.num_classes, pool,
                    keys)

    # dev-b: an enrolled device (its own MQTT password, its own key) that sends an all-zero
    # model claiming 10^9 samples; without the bound FedAvg hands it the whole round
    attacker_key = read_device_key(keys / "devices" / "dev-b.key")
    verify = hub_verifier(keys / HUB_PUBLIC)
    zeros = {k: np.zeros_like(v) for k, v in hub.reference.items()}
    sent: list[int] = []

    def on_task(topic: str, payload: bytes) -> None:
        if not payload:
            return
        task = parse_task(decode(payload, verifier=verify))
        if task.state == "open" and "dev-b" in task.selected and task.round not in sent:
            sent.append(task.round)
            attacker.publish(topics.device_update("dev-b"), build_update_message(
                FLEET, task.run, "dev-b", task.round, task.model_version, zeros, num_samples=INFLATED,
                key=attacker_key), qos=1)

    attacker = _link(_cfg(pki, secure_broker, "dev-b"), "attacker")
    attacker.subscribe(topics.round, on_task)
    attacker.publish(topics.device_status("dev-b"), status_payload("online", device="dev-b", num_samples=announced),
                     qos=1, retain=True)
    try:
        honest.start()
        with caplog.at_level("WARNING", logger="fedge.hub"):
            history = hub.run()
    finally:
        honest.stop()
        attacker.publish(topics.device_status("dev-b"), b"", qos=1, retain=True).wait_for_publish(5)
        attacker.stop()
        pool.close()

    assert sent == [1, 2], sent  # the attacker did send in every round
    assert [r["participants"] for r in history] == [["dev-a"], ["dev-a"]]
    rejections = hub.store.rejections()
    assert [(r["device"], r["round"]) for r in rejections] == [("dev-b", 1), ("dev-b", 2)], rejections
    expected = ("above the 800 its device announced" if announced == 800 else "above the hub's max_samples=1000000")
    assert all(f"claims num_samples={INFLATED}" in r["reason"] and expected in r["reason"] for r in rejections)
    assert f"rejected update from dev-b (round 1): claims num_samples={INFLATED}" in caplog.text
    if announced == INFLATED:
        assert f"device dev-b announces {INFLATED} samples, above max_samples=1000000" in caplog.text
    # the global model is the honest device's, not the attacker's zeros: it learned
    assert any(float(np.abs(v).max()) > 0 for v in hub.global_state.values())
    assert history[-1]["accuracy"] > max(0.4, initial_acc + 0.2), (initial_acc, history)


# ----------------------------------------------------------------------------- agent: item 5
class FakeHub:
    """The hub's MQTT user with the hub's real signing key, publishing whatever it is told
    (a buggy or compromised hub), and reading the devices' statuses and updates."""

    def __init__(self, pki, broker, topics: Topics, keys) -> None:  # noqa: ANN001
        self.topics = topics
        self.sign = hub_signer(keys)
        self.updates, self.statuses = Inbox(), Inbox()
        self.link = _link(_cfg(pki, broker, HUB_USER), "fake-hub",
                          {topics.all_device_updates: self.updates, topics.all_device_status: self.statuses})

    def publish_round(self, tensors: dict, train: dict, version: int = 0) -> None:
        model = build_model_message(FLEET, "run-x", version, "mlp", tensors, signer=self.sign)
        task = TaskMessage(fleet=FLEET, run="run-x", round=version + 1, model_version=version, selected=["dev-a"],
                           deadline=time.time() + 60, train=train, state="open")
        self.link.publish(self.topics.model, model, qos=1, retain=True).wait_for_publish(5)
        self.link.publish(self.topics.round, build_task_message(task, self.sign), qos=1, retain=True).wait_for_publish(5)

    def refusal(self, timeout: float = 20.0) -> dict | None:
        end = time.time() + timeout
        while time.time() < end:
            for payload in self.statuses.payloads():
                info = json.loads(payload) if payload else {}
                if "refused" in info:
                    return info["refused"]
            if self.updates.payloads():
                return None
            time.sleep(0.1)
        return None

    def close(self) -> None:
        for topic in (self.topics.model, self.topics.round):
            self.link.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.link.stop()


def _state(small_data):  # noqa: ANN001, ANN202
    from fedge.models.registry import build_model, get_state

    return get_state(build_model("mlp", small_data.in_shape, small_data.num_classes))


def _nan_model(state):  # noqa: ANN001, ANN202
    bad = {k: v.copy() for k, v in state.items()}
    first = next(iter(bad))
    bad[first].flat[:3] = [np.nan, np.nan, np.inf]
    return bad


REFUSALS = {
    "nan-model": (_nan_model, {"lr": 0.05}, {}, "model version 0 has non-finite weights: tensor 'net.1.weight' "
                                                "holds 2 NaN and 1 Inf"),
    "lr-nan": (None, {"lr": math.nan}, {}, "task setting 'lr' must be a finite number, got nan"),
    "batch-negative": (None, {"batch_size": -5}, {}, "task setting 'batch_size' is -5; it must be a positive integer"),
    "epochs-negative": (None, {"epochs": -1}, {}, "task setting 'epochs' is -1; this device allows 1..20"),
    "epochs-huge": (None, {"epochs": 10**6}, {}, "task setting 'epochs' is 1000000; this device allows 1..20"),
    "over-time-budget": (None, {"epochs": 20, "batch_size": 1}, {"max_train_seconds": 0.2},
                         "training stopped after 0."),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_device_refuses_a_signed_but_bad_round_and_says_why(pki, secure_broker, topic_prefix, small_data, keys,
                                                             caplog, case):
    from fedge.edge_agent.pool import TrainingPool

    make_model, train, profile_kw, reason = REFUSALS[case]
    topics = Topics(FLEET, topic_prefix)
    state = _state(small_data)
    hub = FakeHub(pki, secure_broker, topics, keys)
    pool = TrainingPool(workers=1, threads_per_worker=1)
    agent = _agent(pki, secure_broker, topics, small_data.train, small_data.num_classes, pool, keys, **profile_kw)
    try:
        with caplog.at_level("ERROR", logger="fedge.agent"):
            agent.start()
            hub.publish_round(make_model(state) if make_model else state, train)
            refused = hub.refusal()
            time.sleep(0.5)  # an update, if one were (wrongly) sent, has time to arrive
    finally:
        agent.stop()
        pool.close()
        hub.close()
    assert refused is not None, f"no refusal in the status; updates: {len(hub.updates.payloads())}"
    assert refused["round"] == 1 and refused["run"] == "run-x"
    assert refused["reason"].startswith(reason), refused
    assert f"dev-a: cannot train round 1: {reason}" in caplog.text
    assert hub.updates.payloads() == []  # nothing was sent with this device's weight
    assert agent.rounds_trained == 0


def test_the_same_harness_trains_a_sane_round(pki, secure_broker, topic_prefix, small_data, keys):
    """The control for the refusals above: a sane signed round is trained and answered."""
    from fedge.edge_agent.pool import TrainingPool

    topics = Topics(FLEET, topic_prefix)
    hub = FakeHub(pki, secure_broker, topics, keys)
    pool = TrainingPool(workers=1, threads_per_worker=1)
    agent = _agent(pki, secure_broker, topics, small_data.train, small_data.num_classes, pool, keys)
    try:
        agent.start()
        hub.publish_round(_state(small_data), {"lr": 0.05, "epochs": 2, "batch_size": 32})
        assert hub.refusal() is None
    finally:
        agent.stop()
        pool.close()
        hub.close()
    assert len(hub.updates.payloads()) == 1 and agent.rounds_trained == 1


def test_the_hub_logs_a_devices_refusal(pki, secure_broker, topic_prefix, small_data, keys, tmp_path, caplog):
    """A hub configured with epochs 10^6 (a typo) gets no update, and its log says why."""
    from fedge.edge_agent.pool import TrainingPool
    from fedge.hub.config import HubConfig
    from fedge.hub.hub import Hub
    from fedge.hub.store import RunStore

    hub_cfg = HubConfig(fleet=FLEET, prefix=topic_prefix, model="mlp", rounds=1, min_devices=1, deadline_s=3,
                        wait_devices_s=30, max_round_retries=0, train={"epochs": 10**6}, keys_dir=str(keys),
                        in_shape=small_data.in_shape, num_classes=small_data.num_classes)
    hub = Hub(hub_cfg, _cfg(pki, secure_broker, HUB_USER), RunStore(tmp_path / "runs" / "typo"))
    pool = TrainingPool(workers=1, threads_per_worker=1)
    agent = _agent(pki, secure_broker, Topics(FLEET, topic_prefix), small_data.train, small_data.num_classes, pool,
                   keys)
    try:
        agent.start()
        with caplog.at_level("WARNING", logger="fedge.hub"), pytest.raises(RuntimeError, match="round 1 failed"):
            hub.run()
    finally:
        agent.stop()
        pool.close()
    assert "device dev-a refused round 1: task setting 'epochs' is 1000000; this device allows 1..20" in caplog.text


def test_an_agent_without_the_hub_key_warns_at_start(pki, secure_broker, topic_prefix, small_data, keys, caplog,
                                                     capsys):
    from fedge.edge_agent.pool import TrainingPool

    pool = TrainingPool(workers=1, threads_per_worker=1)
    try:
        for device, verified in (("dev-a", True), ("dev-b", False)):
            agent = _agent(pki, secure_broker, Topics(FLEET, topic_prefix), small_data.train, small_data.num_classes,
                           pool, keys, device=device, verified=verified)
            with caplog.at_level("WARNING", logger="fedge.agent"):
                agent.start()
            agent.stop()
            warned = [r.message for r in caplog.records if "no hub public key" in r.message]
            assert bool(warned) == (not verified), (device, warned)
    finally:
        pool.close()
    assert warned[0].startswith("dev-b: no hub public key (--hub-public-key): this agent trains any model and task")
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    assert "WITHOUT IT the agent trains any model and task" in " ".join(capsys.readouterr().out.split())
