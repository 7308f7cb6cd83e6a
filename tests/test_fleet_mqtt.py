"""End to end over real brokers (embedded amqtt and Mosquitto): virtual devices, hub, rounds.

Every test uses its own topic prefix, so runs sharing Mosquitto never see each other.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.partition import PartitionSpec
from fedge.models.wire.messages import build_update_message

from .inbox import raw_client


def _fleet(broker_url: str, prefix: str, tmp_path, data, devices: int = 4, **hub_kw) -> Fleet:
    hub = HubConfig(fleet="t", prefix=prefix, model="mlp", rounds=3, deadline_s=20,
                    train={"lr": 0.05, "batch_size": 32, "epochs": 1}, **hub_kw)
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=broker_url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)




def test_four_devices_three_rounds_learn(broker_url, topic_prefix, tmp_path, small_data):
    with _fleet(broker_url, topic_prefix, tmp_path, small_data) as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(len(r["participants"]) == 4 for r in report["rounds"])
    assert report["final_accuracy"] > 0.5, report["final_accuracy"]  # chance is 0.10
    assert report["rounds"][-1]["accuracy"] > report["rounds"][0]["accuracy"] - 0.05
    # every byte that crossed MQTT is accounted for: an fp32 MLP update is ~0.8 MB
    assert 790_000 < report["uplink_bytes_per_device"] < 810_000
    run_dir = tmp_path / report["run_id"]
    for name in ("run.json", "final_model.fedge", "partition.json", "accuracy.png"):
        assert (run_dir / name).stat().st_size > 0


def test_dead_device_does_not_stall_the_round_past_its_deadline(broker_url, topic_prefix, tmp_path, small_data):
    fleet = _fleet(broker_url, topic_prefix, tmp_path, small_data, devices=4)
    fleet.cfg.hub.rounds = 2
    fleet.cfg.hub.deadline_s = 4
    with fleet:
        victim = fleet.agents[1]
        victim.crash()  # gone without a goodbye before the round starts: selected, never answers
        hub = fleet.make_hub()
        hub.config.min_devices = 3
        start = time.time()
        report = fleet.run(hub)
        elapsed = time.time() - start
    assert report["rounds_completed"] == 2
    for rec in report["rounds"]:
        assert victim.device_id not in rec["participants"]
        assert len(rec["participants"]) >= 3
        assert rec["seconds"] < 4 + 6  # the deadline, plus training and aggregation time
    assert elapsed < 60
    assert report["final_accuracy"] > 0.4


def test_malformed_updates_are_logged_and_the_hub_carries_on(broker_url, topic_prefix, tmp_path, small_data, caplog):
    fleet = _fleet(broker_url, topic_prefix, tmp_path, small_data, devices=3)
    fleet.cfg.hub.rounds = 2
    with fleet:
        hub = fleet.make_hub()
        attacker = raw_client(broker_url)
        topic = hub.topics.device_update("dev000")
        good = build_update_message("t", hub.run_id, "dev000", 1, 0, hub.reference, num_samples=5)
        bad_shape = {k: np.zeros((3,), np.float32) for k in hub.reference}
        junk = [
            b"garbage",
            good[:-10],  # truncated
            good[:4] + b"\x07" + good[5:],  # wrong protocol version
            build_update_message("t", hub.run_id, "dev000", 1, 0, bad_shape, num_samples=5),
            build_update_message("t", hub.run_id, "dev999", 1, 0, hub.reference, num_samples=5),  # spoofed sender
            build_update_message("t", "another-run", "dev000", 1, 0, hub.reference, num_samples=5),
        ]

        def spray() -> None:  # the junk once into round 1 and once into round 2, while each is open
            for round_id in (1, 2):
                hub.wait_for_round(round_id, timeout=60)
                for payload in junk:
                    attacker.publish(topic, payload, qos=1).wait_for_publish(5)

        threading.Thread(target=spray, daemon=True).start()
        with caplog.at_level("WARNING", logger="fedge.hub"):
            report = fleet.run(hub)
        attacker.loop_stop()
        attacker.disconnect()
    assert report["rounds_completed"] == 2
    assert report["final_accuracy"] > 0.4
    reasons = [r["reason"] for r in hub.store.rejections()]
    assert len(reasons) >= len(junk)
    joined = "\n".join(reasons)
    for expected in ("truncated", "protocol version 7", "shape", "published on 'dev000'", "not this run"):
        assert expected in joined, (expected, joined)
    assert "rejected update from dev000" in caplog.text


def test_hub_restarted_mid_run_resumes_without_losing_or_repeating_rounds(broker_url, topic_prefix, tmp_path, small_data):
    fleet = _fleet(broker_url, topic_prefix, tmp_path, small_data, devices=3)
    fleet.cfg.hub.rounds = 4
    with fleet:
        first = fleet.make_hub()

        def stop_once_round_3_has_an_update() -> None:
            first.wait_for_round(3, timeout=120, min_updates=1)
            first.stop()  # the hub goes away mid-collection, with round 3 partly received

        threading.Thread(target=stop_once_round_3_has_an_update, daemon=True).start()
        first_history = first.run()
        assert [r["round"] for r in first_history] == [1, 2]
        assert first.store.get_open_round()[0] == 3
        assert len(first.store.pending(3)) >= 1
        second = fleet.make_hub(resume=True)
        assert second.version == 2
        report = fleet.run(second)
    rounds = [r["round"] for r in report["rounds"]]
    assert rounds == [1, 2, 3, 4]
    assert [r["model_version"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["final_accuracy"] > 0.5


# (rule, threshold, lr): on this data the rule first fires at round 3 (accuracy ~0.59 -> ~0.81 at lr
# 0.015) or round 4 (relative change ~0.13 -> ~0.02 at lr 0.05): thresholds sit well inside those gaps
@pytest.mark.parametrize("rule, threshold, lr", [("target_score", 0.7, 0.015), ("min_weight_change", 0.05, 0.05)])
def test_stop_rules_end_the_run_early(embedded_broker, topic_prefix, tmp_path, small_data, rule, threshold, lr):
    fleet = _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=3)
    fleet.cfg.hub.rounds = 10
    fleet.cfg.hub.train = {**fleet.cfg.hub.train, "lr": lr}
    setattr(fleet.cfg.hub, rule, threshold)
    with fleet:
        agents = fleet.agents
        report = fleet.run()
        assert all(a.finished.wait(10) for a in agents)  # the hub told every device the run is over
    rounds = report["rounds"]
    assert 3 <= report["rounds_completed"] == len(rounds) < 10, [(r["accuracy"], r["weight_change"]) for r in rounds]

    def fired(rec: dict) -> bool:
        return rec["accuracy"] >= threshold if rule == "target_score" else rec["weight_change"] < threshold

    # the run stopped at the first round where the rule holds: not before, not after
    assert fired(rounds[-1]) and not any(fired(r) for r in rounds[:-1]), [(r["accuracy"], r["weight_change"]) for r in rounds]


def test_fp16_downlink_halves_the_model_bytes_and_checkpoints_stay_exact(embedded_broker, topic_prefix, tmp_path,
                                                                         small_data):
    """--model-codec fp16: devices receive half the bytes and still learn; the hub keeps and
    checkpoints the exact fp32 model, so a resume or the final file carries no rounding."""
    from fedge.models.wire import decode
    from fedge.models.wire.messages import parse_model

    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, model_codec="fp16") as fleet:
        hub = fleet.make_hub()
        report = fleet.run(hub)
    assert report["rounds_completed"] == 3 and report["final_accuracy"] > 0.5, report["final_accuracy"]
    # the MLP is 198,800 weights: ~0.4 MB per fp16 model envelope against ~0.8 MB in fp32
    assert 390_000 < report["downlink_bytes_per_device"] < 410_000, report["downlink_bytes_per_device"]
    stored = parse_model(decode(hub.store.load_checkpoint(3)))
    final = parse_model(decode((tmp_path / report["run_id"] / "final_model.fedge").read_bytes()))
    for k, v in hub.global_state.items():
        np.testing.assert_array_equal(stored.tensors[k], v)
        np.testing.assert_array_equal(final.tensors[k], v)
    assert any(not np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in hub.global_state.values())
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, model_codec="mask1") as fleet:
        with pytest.raises(ValueError, match="cannot carry a model"):
            fleet.make_hub()


def test_q8_downlink_quarters_the_model_bytes_and_devices_decode_the_hubs_quantised_model(
        embedded_broker, topic_prefix, tmp_path, small_data):
    """--model-codec q8: ~8.25 bits per weight down, devices still learn, every device holds
    exactly q8(the hub's exact model) for the version it received, and checkpoints stay fp32."""
    from fedge.models.wire import decode, decode_tensors, encode_tensors
    from fedge.models.wire.messages import parse_model

    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, model_codec="q8") as fleet:
        hub = fleet.make_hub()
        report = fleet.run(hub)
        agents = fleet.agents
        assert all(a.finished.wait(10) for a in agents)
    assert report["rounds_completed"] == 3 and report["final_accuracy"] > 0.5, report["final_accuracy"]  # chance 0.10
    # the MLP is 198,800 weights: 198,800 + 8 per block of 256 (~6.3 KB) bytes against ~0.8 MB in fp32
    assert 200_000 < report["downlink_bytes_per_device"] < 210_000, report["downlink_bytes_per_device"]
    for agent in agents:
        held = agent._model
        assert held is not None and held.run == report["run_id"]
        exact = parse_model(decode(hub.store.load_checkpoint(held.version))).tensors
        expected = decode_tensors(*encode_tensors(exact, "q8"))
        assert list(held.tensors) == list(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(held.tensors[k], v)
    final = parse_model(decode((tmp_path / report["run_id"] / "final_model.fedge").read_bytes()))
    for k, v in hub.global_state.items():
        np.testing.assert_array_equal(final.tensors[k], v)
    assert any(not np.array_equal(v, expected[k]) for k, v in exact.items())  # q8 did round


@pytest.mark.parametrize("codec", ["q8", "fp16"])
def test_lossy_downlink_error_is_added_back_so_the_hub_moves_by_the_devices_changes_only(
        codec, topic_prefix, tmp_path, small_data):
    """Devices that do not move (lr 1e-30: every step is below a float32 ulp of the weights)
    send back exactly the rounded model they received; the hub adds the rounding back
    (Hub._downlink_error), so after two rounds its model is still the initial one, not snapped
    to the downlink's grid."""
    from fedge.models.wire import decode, decode_tensors, encode_tensors
    from fedge.models.wire.messages import parse_model

    hub_cfg = HubConfig(fleet="t", prefix=topic_prefix, model="mlp", rounds=2, deadline_s=20, model_codec=codec,
                        train={"lr": 1e-30, "momentum": 0.0, "batch_size": 32, "epochs": 1})
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid"), transport="inproc",
                      runs_dir=str(tmp_path), progress=False, hub=hub_cfg)
    with Fleet(cfg, dataset=small_data) as fleet:
        hub = fleet.make_hub()
        initial = {k: v.copy() for k, v in hub.global_state.items()}
        report = fleet.run(hub)
    assert report["rounds_completed"] == 2
    rounded = decode_tensors(*encode_tensors(initial, codec))
    assert max(float(np.abs(rounded[k] - v).max()) for k, v in initial.items()) > 1e-5  # the codec does round
    final = parse_model(decode(hub.store.load_checkpoint(2))).tensors
    for k, v in initial.items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=1e-7, err_msg=k)
