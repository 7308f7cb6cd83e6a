"""1-bit MPT-FL over a real broker: score averaging and the 1-bit mask uplink both learn, the
uplink really is one bit per weight, and malformed masks or NaN scores are refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import paho.mqtt.client as mqtt

from hub.fleet import Fleet, FleetConfig
from hub.hub import HubConfig
from models.partition import PartitionSpec
from models.registry import build_model, get_state
from models.wire import decode, decode_tensors
from models.wire.codecs import encode_tensors
from models.wire.messages import build_update_message
from models.wire.transport import BrokerConfig

MPT_TRAIN = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 2, "batch_size": 32}


def _fleet(url: str, prefix: str, tmp_path, data, strategy: str, rounds: int = 3) -> Fleet:
    hub = HubConfig(fleet="mpt", prefix=prefix, model="mlp-mpt", rounds=rounds, deadline_s=60, strategy=strategy,
                    train=dict(MPT_TRAIN))
    cfg = FleetConfig(devices=4, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


def test_conv4_mask_upload_is_one_bit_per_weight():
    model = build_model("conv4-mpt")
    from models.supermask import model_masks

    masks = model_masks(model)
    fields, body = encode_tensors(masks, "mask1")
    assert len(body) == 1_932_352 // 8 == 241_544
    env = decode(build_update_message("f", "r", "d", 1, 0, masks, 40, codec="mask1"))
    assert len(body) < len(env.body) + 1 and len(build_update_message("f", "r", "d", 1, 0, masks, 40, codec="mask1")) < 241_544 + 2048
    back = decode_tensors(fields, body)
    assert all(np.array_equal(back[k] != 0, masks[k]) for k in masks)
    for name, mask in masks.items():  # prune ratio 0.8 keeps 20 % (ceil) of every layer
        assert int(mask.sum()) == -(-mask.size // 5), name
    assert set(get_state(model)) == set(masks)  # only scores travel; frozen weights never do


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
    assert report["downlink_bytes_per_device"] > 198_800 * 4  # the hub sends float scores back (32 bit)


def test_bad_masks_and_nan_scores_are_rejected(embedded_broker, topic_prefix, tmp_path, small_data):
    cfg = BrokerConfig.from_url(embedded_broker)
    attacker = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    attacker.connect(cfg.host, cfg.port)
    attacker.loop_start()
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "mpt-mask", rounds=2) as fleet:
        hub = fleet.make_hub()

        def attack() -> None:
            while hub._task is None:
                time.sleep(0.02)
            task = hub._task
            short = {k: np.ones(v.size - 8, np.float32) for k, v in hub.reference.items()}
            nan = {k: v.copy() for k, v in hub.reference.items()}
            next(iter(nan.values())).flat[0] = np.nan
            good = build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version,
                                        hub.reference, 10, codec="mask1")
            sends = [
                build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version, short, 10,
                                     codec="mask1"),
                build_update_message("mpt", hub.run_id, "dev000", task.round, task.model_version, nan, 10),
                good[:-200] + good[-168:],  # body cut short: the digest no longer matches
            ]
            for payload in sends:
                attacker.publish(hub.topics.device_update("dev000"), payload, qos=1)

        threading.Thread(target=attack, daemon=True).start()
        report = fleet.run(hub)
    attacker.loop_stop()
    assert report["rounds_completed"] == 2
    reasons = "\n".join(r["reason"] for r in hub.store.rejections())
    assert "has shape" in reasons and "NaN or Inf" in reasons, reasons
    assert "truncated" in reasons or "digest mismatch" in reasons, reasons


def test_mpt_run_leaves_a_mask_file_that_exports_and_predicts(embedded_broker, topic_prefix, tmp_path, small_data):
    import onnxruntime as ort

    from models.export import export

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
