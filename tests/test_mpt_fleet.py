"""1-bit MPT-FL over a real broker: score averaging and the 1-bit mask and sign uplinks learn,
the uplink really is one bit per weight, and malformed masks, NaN scores or an update in the
wrong codec are refused."""

from __future__ import annotations

import json
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.strategies import make_strategy
from fedge.hub.strategies.sign_delta import SignDelta
from fedge.models.partition import PartitionSpec
from fedge.models.registry import build_model, get_state
from fedge.models.wire import decode, decode_tensors
from fedge.models.wire.codecs import encode_tensors
from fedge.models.wire.envelope import DIGEST_SIZE, PREFIX_SIZE, EnvelopeError
from fedge.models.wire.messages import build_update_message
from fedge.models.wire.transport import BrokerConfig

MPT_TRAIN = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 2, "batch_size": 32}


def _fleet(url: str, prefix: str, tmp_path, data, strategy: str, rounds: int = 3) -> Fleet:
    hub = HubConfig(fleet="mpt", prefix=prefix, model="mlp-mpt", rounds=rounds, deadline_s=60, strategy=strategy,
                    train=dict(MPT_TRAIN))
    cfg = FleetConfig(devices=4, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


def _run_under_attack(url: str, prefix: str, tmp_path, data, strategy: str, forge) -> tuple[dict, str]:  # noqa: ANN001
    """Run 2 rounds while a rogue MQTT client publishes forge(hub, task) -> [(device, payload)]
    as soon as round 1 opens; returns (fleet report, the hub's rejection reasons)."""
    cfg = BrokerConfig.from_url(url)
    attacker = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    attacker.connect(cfg.host, cfg.port)
    attacker.loop_start()
    with _fleet(url, prefix, tmp_path, data, strategy, rounds=2) as fleet:
        hub = fleet.make_hub()

        def attack() -> None:
            task = hub.wait_for_round(1, timeout=120)
            for device, payload in forge(hub, task):
                attacker.publish(hub.topics.device_update(device), payload, qos=1)

        threading.Thread(target=attack, daemon=True).start()
        report = fleet.run(hub)
    attacker.loop_stop()
    return report, "\n".join(r["reason"] for r in hub.store.rejections())


def test_conv4_mask_upload_is_one_bit_per_weight():
    model = build_model("conv4-mpt")
    from fedge.models.supermask import model_masks

    masks = model_masks(model)
    fields, body = encode_tensors(masks, "mask1")
    # independent expectation: each tensor's bits rounded up to whole bytes (Conv-4: 1,932,352 weights)
    assert sum(m.size for m in masks.values()) == 1_932_352
    assert len(body) == sum((m.size + 7) // 8 for m in masks.values()) == 241_544
    message = build_update_message("f", "r", "d", 1, 0, masks, 40, codec="mask1")
    env = decode(message)
    head = json.dumps(env.header, separators=(",", ":"), sort_keys=True).encode()
    assert len(message) == PREFIX_SIZE + len(head) + 241_544 + DIGEST_SIZE  # frame + header + bits, nothing else
    assert len(head) < 2048
    back = decode_tensors(fields, body)
    assert all(np.array_equal(back[k] != 0, masks[k]) for k in masks)
    for name, mask in masks.items():  # prune ratio 0.8 keeps 20 % (ceil) of every layer
        assert int(mask.sum()) == -(-mask.size // 5), name
    assert set(get_state(model)) == set(masks)  # only scores travel; frozen weights never do


def test_mask_codec_packs_each_tensor_msb_first_padded_to_a_byte():
    """Bit layout by hand: 9 elements -> 2 bytes (MSB first, zero padding), then the next tensor
    starts on a fresh byte."""
    masks = {"a": np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], np.float32), "b": np.array([[0, 1], [1, 0]], np.float32)}
    fields, body = encode_tensors(masks, "mask1")
    assert body == bytes([0b10000001, 0b10000000, 0b01100000])
    back = decode_tensors(fields, body)
    assert all(np.array_equal(back[k], masks[k]) for k in masks)


def test_mpt_score_averaging_learns(embedded_broker, topic_prefix, tmp_path, small_data):
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "mpt-score-avg") as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.3, report["final_accuracy"]  # chance 0.10
    assert report["uplink_bytes_per_device"] > 198_800 * 4  # fp32 scores


def test_mpt_one_bit_uplink_learns_and_sends_bits(mosquitto_url, topic_prefix, tmp_path, small_data):
    with _fleet(mosquitto_url, topic_prefix, tmp_path, small_data, "mpt-mask") as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.25, report["final_accuracy"]
    assert report["uplink_bytes_per_device"] < 198_800 / 8 + 2048  # one bit per weight + header
    # the hub records the bodies alone too: mlp-mpt's three score tensors, each packed to whole bytes
    assert report["uplink_body_bytes_per_device"] == (784 * 200 + 200 * 200 + 200 * 10) // 8
    assert report["downlink_bytes_per_device"] > 198_800 * 4  # the hub sends float scores back (32 bit)


def test_bad_masks_and_nan_scores_are_rejected(embedded_broker, topic_prefix, tmp_path, small_data):
    def forge(hub, task):  # noqa: ANN001, ANN202
        short = {k: np.ones(v.size - 8, np.float32) for k, v in hub.reference.items()}
        nan = {k: v.copy() for k, v in hub.reference.items()}
        next(iter(nan.values())).flat[0] = np.nan
        good = build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version,
                                    hub.reference, 10, codec="mask1")
        return [
            ("dev000", build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version, short, 10,
                                            codec="mask1")),
            ("dev000", build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version, nan, 10)),
            ("dev000", good[:-200] + good[-168:]),  # body cut short: the digest no longer matches
        ]

    report, reasons = _run_under_attack(embedded_broker, topic_prefix, tmp_path, small_data, "mpt-mask", forge)
    assert report["rounds_completed"] == 2
    assert "has shape" in reasons and "NaN or Inf" in reasons, reasons
    assert "truncated" in reasons or "digest mismatch" in reasons, reasons


def test_mpt_run_leaves_a_mask_file_that_exports_and_predicts(embedded_broker, topic_prefix, tmp_path, small_data):
    import onnxruntime as ort

    from fedge.models.export import export

    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "mpt-score-avg", rounds=2) as fleet:
        report = fleet.run()
    run_dir = tmp_path / report["run_id"]
    mask = run_dir / "final_model.mask"
    assert report["files"]["mask_model_bytes"] == mask.stat().st_size
    assert mask.stat().st_size < 198_800 / 8 + 4096  # 1 bit per weight + header (vs 795 KB of fp32 scores)
    summary = export(mask, out=tmp_path / "from_mask.onnx")
    sess = ort.InferenceSession(summary["onnx"])
    logits = sess.run(None, {sess.get_inputs()[0].name: small_data.test.x[:400]})[0]
    accuracy = float((logits.argmax(1) == small_data.test.y[:400]).mean())
    assert abs(accuracy - report["final_accuracy"]) < 0.02, (accuracy, report["final_accuracy"])


def test_sign_codec_is_one_bit_per_weight_and_keeps_direction():
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(size=(256, 6272)).astype(np.float32), "b": rng.normal(size=(3, 5)).astype(np.float32)}
    fields, body = encode_tensors(delta, "sign1")
    assert len(body) == sum(4 + (v.size + 7) // 8 for v in delta.values())
    back = decode_tensors(fields, body)
    for k, v in delta.items():
        assert np.array_equal(back[k] > 0, v > 0)  # every weight's direction survives
        assert np.allclose(np.abs(back[k]), np.mean(np.abs(v)), rtol=1e-6)  # one L2-optimal scale per tensor
    bad = bytearray(body)
    bad[0:4] = np.array([-1.0], dtype="<f4").tobytes()
    with pytest.raises(EnvelopeError, match="scale"):
        decode_tensors(fields, bytes(bad))
    with pytest.raises(EnvelopeError, match="needs"):
        decode_tensors(fields, body[:-1])


def test_sign_delta_rule_is_fedavg_of_rebuilt_states():
    rng = np.random.default_rng(1)
    glob = {"w": rng.normal(size=(4, 4)).astype(np.float32)}
    d1, d2 = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    new = SignDelta()(glob, [({"w": d1}, 30), ({"w": d2}, 10)])
    assert np.allclose(new["w"], glob["w"] + 0.75 * d1 + 0.25 * d2, atol=1e-6)


def test_mpt_sign_uplink_learns_over_mosquitto(mosquitto_url, topic_prefix, tmp_path, small_data):
    with _fleet(mosquitto_url, topic_prefix, tmp_path, small_data, "sign-delta") as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.3, report["final_accuracy"]  # chance 0.10
    assert report["uplink_bytes_per_device"] < 198_800 / 8 + 2048  # one bit per weight + scales + header


def test_update_in_the_wrong_codec_is_refused(embedded_broker, topic_prefix, tmp_path, small_data):
    """Under sign-delta a full-precision state would be read as a step: the hub refuses it."""
    def forge(hub, task):  # noqa: ANN001, ANN202
        device = task.selected[0]
        return [(device, build_update_message("mpt", hub.run_id, device, task.round, task.model_version,
                                              hub.reference, 10, codec="fp32"))]

    report, reasons = _run_under_attack(embedded_broker, topic_prefix, tmp_path, small_data, "sign-delta", forge)
    assert report["rounds_completed"] == 2
    assert "codec 'fp32'" in reasons and "needs 'sign1'" in reasons, reasons


@pytest.mark.parametrize("model, reason", [("conv4-mpt11", "running_mean"), ("mlp", "no pruning scores")])
def test_mask_uplink_refuses_models_a_mask_cannot_carry(model, reason):
    """A 1/1 model's BatchNorm statistics (or a dense model's weights) cannot travel as a mask:
    the run stops at start with the reason, instead of every update being refused."""
    state = get_state(build_model(model, (1, 28, 28), 10))
    with pytest.raises(ValueError, match=reason):
        make_strategy("mpt-mask").check_fits(model, state)
    make_strategy("sign-delta").check_fits(model, state)  # sign-delta moves any state
    make_strategy("mpt-mask").check_fits("conv4-mpt", get_state(build_model("conv4-mpt", (1, 28, 28), 10)))


def test_bnn_run_leaves_a_one_bit_file_with_the_hubs_accuracy(embedded_broker, topic_prefix, tmp_path, small_data,
                                                              monkeypatch):
    """BNN-FL's final model is written as weight signs + scales (final_model.bnn, 1 bit per
    weight) and rebuilds into the model the hub evaluated."""
    from fedge.models.evaluate import evaluate
    from fedge.models.mpt_nets import build_from_mask_file

    monkeypatch.setenv("FEDGE_NO_ONNX", "1")  # ONNX export of BNN models is covered in test_supermask
    hub = HubConfig(fleet="bnn", prefix=topic_prefix, model="mlp-bnn", rounds=3, deadline_s=60,
                    strategy="fedavg", train={"optimizer": "adam", "lr": 1e-3, "epochs": 2, "batch_size": 32})
    cfg = FleetConfig(devices=4, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    with Fleet(cfg, dataset=small_data) as fleet:
        report = fleet.run()
    path = tmp_path / report["run_id"] / "final_model.bnn"
    assert report["files"]["bnn_model_bytes"] == path.stat().st_size < 198_800 // 8 + 4096  # 1 bit per weight
    model = build_from_mask_file(path)
    accuracy = evaluate(model, torch.from_numpy(small_data.test.x), torch.from_numpy(small_data.test.y))["accuracy"]
    assert report["final_accuracy"] > 0.3 and abs(accuracy - report["final_accuracy"]) < 1e-6, (
        accuracy, report["final_accuracy"])
