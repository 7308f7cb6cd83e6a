"""Every kind of bad update is rejected with a logged, stored reason while the hub keeps serving."""

from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np
import paho.mqtt.client as mqtt

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.partition import PartitionSpec
from fedge.models.wire.envelope import MAGIC
from fedge.models.wire.messages import build_update_message
from fedge.models.wire.transport import BrokerConfig


def _client(url: str, on_message=None) -> mqtt.Client:  # noqa: ANN001
    cfg = BrokerConfig.from_url(url)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    if on_message:
        client.on_message = on_message
    client.connect(cfg.host, cfg.port)
    client.loop_start()
    return client


def test_bad_inputs_are_each_rejected_with_a_reason(embedded_broker, topic_prefix, tmp_path, small_data, caplog):
    hub_cfg = HubConfig(fleet="bad", prefix=topic_prefix, model="mlp", rounds=3, clients_per_round=2, deadline_s=20,
                        max_payload=2_000_000, train={"lr": 0.05})
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub_cfg)
    captured: dict[int, tuple[str, bytes]] = {}

    def capture(client, userdata, msg) -> None:  # noqa: ANN001
        from fedge.models.wire import EnvelopeError, decode

        try:
            env = decode(msg.payload)
        except EnvelopeError:
            return  # the attacker's own junk
        captured.setdefault(env.header.get("round"), (msg.topic, msg.payload))

    with Fleet(cfg, dataset=small_data) as fleet:
        hub = fleet.make_hub()
        spy = _client(embedded_broker, capture)
        spy.subscribe(hub.topics.all_device_updates, 1)
        attacker = _client(embedded_broker)

        def attack() -> None:
            task = hub.wait_for_round(2, timeout=120)
            outsider = next(d for d in ("dev000", "dev001", "dev002") if d not in task.selected)
            insider = task.selected[0]
            ref = hub.reference
            nan = {k: v.copy() for k, v in ref.items()}
            next(iter(nan.values()))[0] = np.nan
            head = b"{'kind': update"
            framed = struct.pack(">4sBBII", MAGIC, 1, 0, len(head), 0) + head
            big = {k: np.zeros(v.shape, np.float32) for k, v in ref.items()}
            sends = [
                (outsider, build_update_message("bad", hub.run_id, outsider, task.round, task.model_version, ref, 5)),
                (insider, build_update_message("bad", hub.run_id, insider, task.round, task.model_version, nan, 5)),
                (insider, framed + hashlib.sha256(framed).digest()),
                (insider, build_update_message("bad", hub.run_id, insider, task.round, task.model_version + 7, ref, 5)),
                (insider, build_update_message("bad", hub.run_id, insider, task.round, task.model_version, big, 5,
                                               codec="fp32") + b"\0" * 1_500_000),
            ]
            topic1, payload1 = captured[1]
            attacker.publish(topic1, payload1, qos=1)  # replay of round 1's accepted update
            for device, payload in sends:
                attacker.publish(hub.topics.device_update(device), payload, qos=1)

        threading.Thread(target=attack, daemon=True).start()
        with caplog.at_level("INFO", logger="fedge.hub"):
            report = fleet.run(hub)
        spy.loop_stop()
        attacker.loop_stop()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.4
    reasons = "\n".join(r["reason"] for r in hub.store.rejections())
    # a replayed update of round 1 is indistinguishable from a QoS 1 redelivery: never counted twice
    assert "for round 1 ignored (already counted)" in caplog.text
    assert all(len(r["participants"]) == len(set(r["participants"])) == 2 for r in report["rounds"])
    for expected in (
        "was not selected for round 2",
        "NaN or Inf",
        "header is not UTF-8 JSON",
        "trained on model version 8, the round uses 1",
        "exceeds the limit of 2000000",
    ):
        assert expected in reasons, (expected, reasons)
