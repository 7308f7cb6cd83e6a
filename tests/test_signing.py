"""Authenticity: the hub signs models and tasks (Ed25519), devices tag updates (HMAC with an
enrolled key). Forged models are ignored by agents; forged updates are rejected by the hub."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.partition import PartitionSpec
from fedge.models.registry import build_model, get_state
from fedge.models.wire import EnvelopeError, decode
from fedge.models.wire.keys import enroll_device, hub_signer, hub_verifier, init_hub_keys, read_device_key
from fedge.models.wire.messages import build_model_message, build_update_message
from fedge.models.wire.transport import BrokerConfig


def test_signature_round_trip_and_tamper(tmp_path):
    init_hub_keys(tmp_path)
    state = get_state(build_model("mlp"))
    signed = build_model_message("f", "r", 0, "mlp", state, signer=hub_signer(tmp_path))
    assert decode(signed, verifier=hub_verifier(tmp_path)).signature is not None
    tampered = bytearray(signed)
    tampered[-80] ^= 1  # inside the digest: caught before the signature
    with pytest.raises(EnvelopeError):
        decode(bytes(tampered), verifier=hub_verifier(tmp_path))
    other = tmp_path / "other"
    init_hub_keys(other)
    with pytest.raises(EnvelopeError, match="does not verify"):
        decode(signed, verifier=hub_verifier(other))
    with pytest.raises(EnvelopeError, match="not signed"):
        decode(build_model_message("f", "r", 0, "mlp", state), verifier=hub_verifier(tmp_path))
    key_path = enroll_device(tmp_path, "pi1")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert len(read_device_key(key_path)) == 32


def test_signed_fleet_learns_and_forgeries_are_refused(embedded_broker, topic_prefix, tmp_path, small_data):
    keys = tmp_path / "keys"
    hub_cfg = HubConfig(fleet="signed", prefix=topic_prefix, model="mlp", rounds=3, deadline_s=20,
                        keys_dir=str(keys), train={"lr": 0.05})
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub_cfg)
    broker = BrokerConfig.from_url(embedded_broker)
    forger = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    forger.connect(broker.host, broker.port)
    forger.loop_start()
    with Fleet(cfg, dataset=small_data) as fleet:
        hub = fleet.make_hub()
        zeros = {k: v * 0 for k, v in hub.reference.items()}

        def forge() -> None:
            task = hub.wait_for_round(2, timeout=120)
            # an unsigned model for the round's version: agents must refuse it
            forger.publish(hub.topics.model, build_model_message("signed", hub.run_id, task.model_version, "mlp", zeros),
                           qos=1, retain=True)
            # an update for dev000 tagged with the wrong key, and one from a device never enrolled
            forger.publish(hub.topics.device_update("dev000"), build_update_message(
                "signed", hub.run_id, "dev000", task.round, task.model_version, zeros, 5, key=b"x" * 32), qos=1)
            forger.publish(hub.topics.device_update("mallory"), build_update_message(
                "signed", hub.run_id, "mallory", task.round, task.model_version, zeros, 5, key=b"x" * 32), qos=1)

        threading.Thread(target=forge, daemon=True).start()
        report = fleet.run(hub)
    forger.loop_stop()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.5
    reasons = "\n".join(r["reason"] for r in hub.store.rejections())
    assert "authentication tag does not match" in reasons
    assert "device 'mallory' is not enrolled" in reasons


def test_agent_refuses_unsigned_or_tampered_models_and_tasks(tmp_path, small_data, caplog):
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile
    from fedge.models.wire import Topics
    from fedge.models.wire.messages import TaskMessage, build_task_message

    init_hub_keys(tmp_path)
    signer = hub_signer(tmp_path)
    pool = TrainingPool(1)
    agent = Agent("pi1", load_profile("sim"), BrokerConfig.from_url("mqtt://127.0.0.1:1"), Topics("f"),
                  small_data.train.subset(list(range(50))), 10, pool, hub_verifier=hub_verifier(tmp_path))
    state = get_state(build_model("mlp"))
    finished = TaskMessage("f", "r", 1, 1, [], 0.0, {}, "finished")
    with caplog.at_level("WARNING", logger="fedge.agent"):
        agent._on_model("t", build_model_message("f", "r", 0, "mlp", state))  # unsigned
        forged = bytearray(build_model_message("f", "r", 0, "mlp", state, signer=signer))
        forged[-1] ^= 1  # signature byte altered
        agent._on_model("t", bytes(forged))
        agent._on_task("t", build_task_message(finished))  # unsigned "run is over"
    assert agent._model is None and not agent.finished.is_set()
    assert caplog.text.count("message is not signed") == 2
    assert "signature does not verify" in caplog.text
    agent._on_model("t", build_model_message("f", "r", 0, "mlp", state, signer=signer))
    agent._on_task("t", build_task_message(finished, signer))
    assert agent._model is not None and agent._model.version == 0 and agent.finished.is_set()
    pool.close()
