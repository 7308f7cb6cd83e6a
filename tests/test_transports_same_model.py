"""One round engine: the same small fleet over real MQTT and over the in-memory transport ends
with the same global model, bit for bit, for every strategy x uplink codec (fp32 and fp16 full
states for the float rules, 1-bit sign, 1-bit mask, MPT scores), since both run the same hub,
agents, envelopes and codecs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.strategies import STRATEGIES, make_strategy
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.wire import decode
from fedge.models.wire.codecs import CODECS
from fedge.models.wire.messages import parse_model

# strategy -> (model, options). A strategy with its own codec (Strategy.codec: sign1, mask1) runs
# with it; every other one runs with each float uplink codec (fp32, fp16)
STRATEGY_MODELS: dict[str, tuple[str, dict]] = {
    "fedavg": ("mlp", {}),
    "median": ("mlp", {}),
    "trimmed-mean": ("mlp", {"trim_fraction": 0.34}),  # trims one of the three updates at each end
    "krum": ("mlp", {"byzantine": 0}),
    "multi-krum": ("mlp", {"byzantine": 1}),
    "fedavgm": ("mlp", {"server_momentum": 0.9}),
    "fedadam": ("mlp", {"server_lr": 0.01}),
    "fedprox": ("mlp", {"proximal_mu": 0.1}),
    "sign-delta": ("mlp-mpt", {}),
    "mpt-score-avg": ("mlp-mpt", {}),
    "mpt-mask": ("mlp-mpt", {}),
    "fedpm": ("mlp-fedpm", {}),
}


def _codecs(strategy: str) -> list[str]:
    own = make_strategy(strategy, STRATEGY_MODELS[strategy][1]).codec
    return [own] if own is not None else list(CODECS)


CASES = [(strategy, codec) for strategy in STRATEGY_MODELS for codec in _codecs(strategy)]


def test_every_registered_strategy_is_in_the_matrix():
    assert set(STRATEGY_MODELS) == set(STRATEGIES)


@pytest.fixture(autouse=True)
def _no_onnx(monkeypatch):
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")  # the exported model is not what is compared


def _run(transport: str, strategy: str, codec: str, tmp_path, data, broker: str | None = None,
         prefix: str = "fedge/v1", keys_dir: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    model, options = STRATEGY_MODELS[strategy]
    hub = HubConfig(fleet="same", prefix=prefix, model=model, rounds=2, deadline_s=60, strategy=strategy,
                    strategy_options=options, update_codec=codec, seed=3, keys_dir=keys_dir,
                    train={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 1, "batch_size": 32})
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid", per_device=200),
                      transport=transport, broker=broker, runs_dir=str(tmp_path / transport), progress=False,
                      seed=3, hub=hub)
    with Fleet(cfg, dataset=data) as fleet:
        hub_obj = fleet.make_hub()
        report = fleet.run(hub_obj)
    final = parse_model(decode(hub_obj.store.load_checkpoint(hub_obj.store.last_round()))).tensors
    return report, final


@pytest.mark.parametrize(("strategy", "codec"), CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_inproc_and_mqtt_give_the_same_global_model(strategy, codec, embedded_broker, topic_prefix, tmp_path, small_data):
    keys = str(tmp_path / "keys") if strategy == "fedavg" else None  # signed models/tasks, tagged updates
    over_mqtt, mqtt_state = _run("mqtt", strategy, codec, tmp_path, small_data, broker=embedded_broker,
                                 prefix=topic_prefix, keys_dir=keys)
    in_memory, inproc_state = _run("inproc", strategy, codec, tmp_path, small_data, keys_dir=keys)
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
    for report in (over_mqtt, in_memory):  # the codec really ran on both transports (fp32 model downlink)
        ratio = report["uplink_bytes_per_device"] / report["downlink_bytes_per_device"]
        expected = {"fp32": (0.9, 1.1), "fp16": (0.45, 0.55)}.get(codec, (0.0, 1 / 16))  # 1-bit: under 1/16
        assert expected[0] < ratio < expected[1], f"{strategy} {codec}: uplink/downlink {ratio:.3f}"


def test_inproc_refuses_a_broker_url(tmp_path, small_data):
    cfg = FleetConfig(devices=2, dataset="synthetic", transport="inproc", broker="mqtt://127.0.0.1:1883",
                      runs_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="--transport mqtt"):
        Fleet(cfg, dataset=small_data).start()
    with pytest.raises(ConfigError, match="transport 'udp'"):
        Fleet(FleetConfig(transport="udp", runs_dir=str(tmp_path)), dataset=small_data).start()
