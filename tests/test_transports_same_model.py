"""One round engine: the same small fleet over real MQTT and over the in-memory transport ends
with the same global model, bit for bit, for every strategy x uplink codec (fp32 full state,
1-bit sign, 1-bit mask, MPT scores), since both run the same hub, agents, envelopes and codecs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.strategies import make_strategy
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.wire import decode
from fedge.models.wire.messages import parse_model

CASES = {  # strategy -> model; each strategy's own uplink codec (Strategy.codec)
    "fedavg": "mlp",
    "sign-delta": "mlp-mpt",
    "mpt-score-avg": "mlp-mpt",
    "mpt-mask": "mlp-mpt",
}


@pytest.fixture(autouse=True)
def _no_onnx(monkeypatch):
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")  # the exported model is not what is compared


def _run(transport: str, strategy: str, tmp_path, data, broker: str | None = None, prefix: str = "fedge/v1",
         keys_dir: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    hub = HubConfig(fleet="same", prefix=prefix, model=CASES[strategy], rounds=2, deadline_s=60, strategy=strategy,
                    seed=3, keys_dir=keys_dir,
                    train={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 1, "batch_size": 32})
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid", per_device=200),
                      transport=transport, broker=broker, runs_dir=str(tmp_path / transport), progress=False,
                      seed=3, hub=hub)
    with Fleet(cfg, dataset=data) as fleet:
        hub_obj = fleet.make_hub()
        report = fleet.run(hub_obj)
    final = parse_model(decode(hub_obj.store.load_checkpoint(hub_obj.store.last_round()))).tensors
    return report, final


@pytest.mark.parametrize("strategy", list(CASES))
def test_inproc_and_mqtt_give_the_same_global_model(strategy, embedded_broker, topic_prefix, tmp_path, small_data):
    keys = str(tmp_path / "keys") if strategy == "fedavg" else None  # signed models/tasks, tagged updates
    over_mqtt, mqtt_state = _run("mqtt", strategy, tmp_path, small_data, broker=embedded_broker, prefix=topic_prefix,
                                 keys_dir=keys)
    in_memory, inproc_state = _run("inproc", strategy, tmp_path, small_data, keys_dir=keys)
    assert list(mqtt_state) == list(inproc_state)
    for name in mqtt_state:
        assert np.array_equal(mqtt_state[name], inproc_state[name]), f"{strategy}: {name} differs"
    assert [r["accuracy"] for r in over_mqtt["rounds"]] == [r["accuracy"] for r in in_memory["rounds"]]
    for a, b in zip(over_mqtt["rounds"], in_memory["rounds"], strict=True):  # the same envelopes; only the
        assert abs(a["bytes_up"] - b["bytes_up"]) < 64  # run id and the timing metrics differ in length
    assert over_mqtt["rounds_completed"] == in_memory["rounds_completed"] == 2
    assert in_memory["rejected_updates"] == 0
    # the global model moved (the rounds did something), and run.json says which transport ran
    assert over_mqtt["rounds"][-1]["weight_change"] > 0
    assert json.loads((tmp_path / "inproc" / in_memory["run_id"] / "run.json").read_text())["transport"] == "inproc"
    assert over_mqtt["transport"] == "mqtt"
    if make_strategy(strategy).codec in ("sign1", "mask1"):  # the 1-bit uplink really is cut on both transports
        for report in (over_mqtt, in_memory):
            assert report["uplink_bytes_per_device"] < report["downlink_bytes_per_device"] / 16


def test_inproc_refuses_a_broker_url(tmp_path, small_data):
    cfg = FleetConfig(devices=2, dataset="synthetic", transport="inproc", broker="mqtt://127.0.0.1:1883",
                      runs_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="--transport mqtt"):
        Fleet(cfg, dataset=small_data).start()
    with pytest.raises(ConfigError, match="transport 'udp'"):
        Fleet(FleetConfig(transport="udp", runs_dir=str(tmp_path)), dataset=small_data).start()
