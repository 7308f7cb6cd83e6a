"""Private tensors (a model's per-device head) over a real broker: they never reach the broker
or the hub's files, each device trains and keeps its own across rounds and agent restarts,
and the hub refuses an update that carries one."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.private_store import PrivateStore
from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.trainer import initial_private
from fedge.hub.config import HubConfig
from fedge.hub.hub import Hub
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.store import RunStore
from fedge.models.errors import DataError
from fedge.models.evaluate import evaluate
from fedge.models.partition import PartitionSpec
from fedge.models.registry import build_model, get_state, model_names, private_patterns, set_state, split_state
from fedge.models.wire import Topics, decode
from fedge.models.wire.inproc import InprocBroker
from fedge.models.wire.messages import build_update_message, parse_model, parse_update
from fedge.models.wire.transport import BrokerConfig

MODEL = "mlp-private-head"
SHAPE, CLASSES = (1, 28, 28), 10
TRAIN = {"lr": 0.05, "epochs": 2, "batch_size": 32}


def _names() -> tuple[set[str], set[str]]:
    shared, private = split_state(MODEL, get_state(build_model(MODEL, SHAPE, CLASSES, seed=0)))
    return set(shared), set(private)


def test_registry_declares_private_head_only_for_its_model():
    shared, private = _names()
    assert private == {"head.weight", "head.bias"}
    assert shared and all(k.startswith("encoder.") for k in shared)
    for name in model_names():  # every other model shares everything: nothing changes for them
        if name != MODEL:
            assert private_patterns(name) == ()
            assert not split_state(name, get_state(build_model(name, SHAPE, CLASSES)))[1]


def test_private_store_survives_a_new_instance_and_refuses_a_foreign_file(tmp_path):
    head = initial_private(MODEL, SHAPE, CLASSES, seed=3)
    path = tmp_path / "dev.npz"
    PrivateStore(path).save(MODEL, head)
    back = PrivateStore(path).load(MODEL)
    assert back is not None and all(np.array_equal(back[k], head[k]) for k in head)
    assert PrivateStore(path).load("mlp") is None  # kept for another model: start afresh
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="foreign.npz"):
        PrivateStore(tmp_path / "foreign.npz").load(MODEL)


class _Recorder:
    """A client on the fleet's whole topic tree that keeps every payload the broker carries."""

    def __init__(self, url: str, prefix: str) -> None:
        cfg = BrokerConfig.from_url(url)
        self.payloads: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self._keep(m.topic, bytes(m.payload))
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(10), "recorder did not subscribe"

    def _keep(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.payloads.append((topic, payload))

    def stop(self) -> list[tuple[str, bytes]]:
        self.client.loop_stop()
        self.client.disconnect()
        with self._lock:
            return list(self.payloads)


def _heads(fleet: Fleet) -> dict[str, dict[str, np.ndarray]]:
    return {a.device_id: a.private.load(MODEL) for a in fleet.agents}


def test_private_head_never_leaves_the_device_and_survives_a_restart(mosquitto_url, topic_prefix, tmp_path, small_data):
    shared, private = _names()
    recorder = _Recorder(mosquitto_url, topic_prefix)
    hub_cfg = HubConfig(fleet="priv", prefix=topic_prefix, model=MODEL, rounds=2, deadline_s=60, train=dict(TRAIN))
    cfg = FleetConfig(devices=3, dataset="synthetic", partition=PartitionSpec("iid"),
                      broker=mosquitto_url, runs_dir=str(tmp_path / "runs"), progress=False, hub=hub_cfg,
                      private_dir=str(tmp_path / "private"))
    with Fleet(cfg, dataset=small_data) as fleet:
        hub = fleet.make_hub()
        report = fleet.run(hub)
        heads = _heads(fleet)
        global_shared = hub.global_state

        # 1. nothing private on the broker; the shared tensors do travel, both ways
        seen = {"model": 0, "update": 0}
        for topic, payload in recorder.stop():
            assert not any(name.encode() in payload for name in private), topic  # not even in a header
            kind = topic.rsplit("/", 1)[-1]
            if kind == "model" and payload:
                names = set(parse_model(decode(payload)).tensors)
            elif kind == "update" and payload:
                names = set(parse_update(decode(payload)).tensors)
            else:
                continue
            seen["model" if kind == "model" else "update"] += 1
            assert names == shared, topic
        assert seen["model"] >= 2 and seen["update"] == 2 * 3

        # 2. the hub's files hold the shared tensors only, and it claims no accuracy it cannot measure
        files = sorted((fleet.run_dir / "checkpoints").glob("*.fedge")) + [fleet.run_dir / "final_model.fedge"]
        assert len(files) >= 3
        for path in files:
            assert set(parse_model(decode(path.read_bytes())).tensors) == shared, path.name
        assert all(r["accuracy"] is None and r["train_loss"] is not None for r in report["rounds"])
        assert report["final_accuracy"] is None and "skipped" in report["onnx"]

        # 3. each device trained its own head: moved from the seeded start, different from the others',
        #    and with the federated encoder it separates the test set (chance: 10 %)
        start = initial_private(MODEL, SHAPE, CLASSES, seed=cfg.seed)
        model = build_model(MODEL, SHAPE, CLASSES)
        test_x, test_y = torch.from_numpy(small_data.test.x), torch.from_numpy(small_data.test.y)
        for device, head in heads.items():
            assert set(head) == private
            assert not np.allclose(head["head.weight"], start["head.weight"]), device
            set_state(model, {**global_shared, **head})
            assert evaluate(model, test_x, test_y)["accuracy"] > 0.5, device
        a, b, c = (heads[d]["head.weight"] for d in sorted(heads))
        assert not np.allclose(a, b) and not np.allclose(b, c)

        # 4. restart every agent on the same private-state files; a new run's round trains from the
        #    kept heads (a near-zero lr keeps them where they were: not the seeded start)
        for agent in fleet.agents:
            agent.stop()
        restarted = [
            Agent(a.device_id, a.profile, fleet.connect, a.topics, small_data.train.subset(fleet.parts[i]),
                  CLASSES, fleet.pool, seed=cfg.seed, warn_unverified=False,
                  private_state=tmp_path / "private" / f"{a.device_id}.npz").start()
            for i, a in enumerate(fleet.agents)
        ]
        try:
            for agent in restarted:
                loaded = agent.private.load(MODEL)
                assert all(np.array_equal(loaded[k], heads[agent.device_id][k]) for k in private)
            again = HubConfig(fleet="priv", prefix=topic_prefix, model=MODEL, rounds=1, deadline_s=60,
                              min_devices=3, train={**TRAIN, "lr": 1e-9, "epochs": 1})
            Hub(again, fleet.connect, RunStore(tmp_path / "run2"), small_data.test.x, small_data.test.y).run()
            for agent in restarted:
                assert agent.rounds_trained == 1
                after = agent.private.load(MODEL)
                assert np.allclose(after["head.weight"], heads[agent.device_id]["head.weight"], atol=1e-5)
                assert not np.allclose(after["head.weight"], start["head.weight"])
        finally:
            for agent in restarted:
                agent.stop()


def test_hub_refuses_an_update_that_carries_a_private_tensor(tmp_path, embedded_broker, topic_prefix):
    cfg = HubConfig(fleet="priv", prefix=topic_prefix, model=MODEL, rounds=1)
    hub = Hub(cfg, BrokerConfig.from_url(embedded_broker), RunStore(tmp_path / "run"))
    full = get_state(build_model(MODEL, SHAPE, CLASSES, seed=0))
    payload = build_update_message("priv", hub.run_id, "dev000", 1, 0, full, 10)
    hub._on_update(hub.topics.device_update("dev000"), payload)
    reasons = [r["reason"] for r in hub.store.rejections()]
    assert len(reasons) == 1 and "private tensor" in reasons[0] and "head." in reasons[0]


def test_export_refuses_a_hub_file_without_the_private_head(tmp_path):
    from fedge.models.export import ExportError, export
    from fedge.models.wire.messages import build_model_message

    shared, _ = split_state(MODEL, get_state(build_model(MODEL, SHAPE, CLASSES, seed=0)))
    path = tmp_path / "final_model.fedge"
    path.write_bytes(build_model_message("priv", "run", 2, MODEL, shared, meta={"in_shape": [1, 28, 28], "num_classes": 10}))
    with pytest.raises(ExportError, match="head"):
        export(path, out=tmp_path / "m.onnx")


def test_design_doc_shows_the_real_code():
    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "design.md").read_text().split("## Private tensors", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    sources = "".join((root / f).read_text() for f in ("models/registry.py", "edge_agent/agent.py", "edge_agent/tasks.py"))
    assert len(blocks) == 5
    for block in blocks:
        assert block in sources, block[:80]


def test_fedge_agent_processes_keep_their_head_in_a_file(tmp_path, mosquitto_url, topic_prefix):
    """`fedge agent` as users run it: the head lands next to --data by default, or in --private-state."""
    import os
    import subprocess
    import sys

    fedge = [sys.executable, "-m", "fedge.cli"]
    parts = tmp_path / "parts"
    made = subprocess.run(fedge + ["partition", "--dataset", "synthetic", "--devices", "2", "--out", str(parts)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    common = ["--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "heads"]
    chosen = tmp_path / "state" / "pi1-head.npz"
    extra = [[], ["--private-state", str(chosen)]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agents = [subprocess.Popen(fedge + ["agent", *common, "--profile", "sim", "--data", str(parts / f"dev00{i}.npz"),
                                        "--device-id", f"pi{i}", "--once", *extra[i]],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    hub = subprocess.run(fedge + ["hub", *common, "--dataset", "synthetic", "--model", MODEL, "--rounds", "1",
                                  "--min-devices", "2", "--runs-dir", str(tmp_path), "--run-id", "r", "--wait-devices", "60"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert hub.returncode == 0, hub.stderr[-3000:]
    for proc in agents:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "trained 1 round(s)" in out, out[-2000:]
    start = initial_private(MODEL, SHAPE, CLASSES, seed=0)
    for path in (parts / "fedge-agent-private-heads-pi0.npz", chosen):
        head = PrivateStore(path).load(MODEL)
        assert head is not None and set(head) == {"head.weight", "head.bias"}, path
        assert not np.allclose(head["head.weight"], start["head.weight"]), path


def test_kept_head_of_another_shape_is_replaced_by_a_fresh_one(tmp_path, small_data):
    path = tmp_path / "dev.npz"
    PrivateStore(path).save(MODEL, initial_private(MODEL, SHAPE, 5, seed=0))  # a head for 5 classes
    agent = Agent("dev000", load_profile("sim"), InprocBroker().link, Topics("priv"), small_data.train,
                  CLASSES, pool=None, private_state=path)  # type: ignore[arg-type] - no job runs here
    head = agent.private_tensors(MODEL)
    assert head["head.weight"].shape == (CLASSES, 200)
    assert np.array_equal(head["head.weight"], initial_private(MODEL, SHAPE, CLASSES, seed=0)["head.weight"])
