"""Many MQTT links on one network thread (models/wire/mqtt_loop.py), with a private Mosquitto:
a fleet of 200 devices connects and trains over one loop, a killed link's will fires, and every
link reconnects and resubscribes after the broker restarts."""

from __future__ import annotations

import threading
import time

import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.data import synthetic
from fedge.models.partition import PartitionSpec
from fedge.models.wire.transport import BrokerConfig, SharedLoopLinks

from .inbox import Inbox
from .mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.usefixtures("mosquitto_bin")


def _loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fedge-mqtt")]


def test_200_devices_share_one_network_thread_and_learn(tmp_path, topic_prefix):
    data = synthetic(n_train=20000, n_test=400, seed=1)  # 100 examples per device
    broker = MosquittoProcess(tmp_path / "broker").start()
    try:
        hub = HubConfig(fleet="loop200", prefix=topic_prefix, model="mlp", rounds=3, clients_per_round=20,
                        deadline_s=120, train={"lr": 0.1, "batch_size": 16, "epochs": 5})
        cfg = FleetConfig(devices=200, dataset="synthetic", partition=PartitionSpec("iid"), broker=broker.url,
                          runs_dir=str(tmp_path / "runs"), progress=False, hub=hub)
        with Fleet(cfg, dataset=data) as fleet:
            assert len(fleet.agents) == 200 and all(a.link.connected for a in fleet.agents)
            # one thread serves the 200 devices (the hub, made later, gets a loop of its own)
            assert _loop_threads() == ["fedge-mqtt-shared"], _loop_threads()
            assert fleet.device_links is not None and fleet.device_links.loop.clients == 200
            report = fleet.run()
        assert report["rounds_completed"] == 3
        assert report["final_accuracy"] > 0.4, report["final_accuracy"]  # chance is 0.10
    finally:
        broker.stop()
    assert _loop_threads() == []  # the fleet's loop ended with it


def test_killed_link_will_fires_and_the_others_reconnect_after_a_broker_restart(tmp_path, topic_prefix):
    broker = MosquittoProcess(tmp_path / "broker").start()
    links = SharedLoopLinks(BrokerConfig.from_url(broker.url))
    watcher = links(f"watch-{topic_prefix}", clean_session=True)
    wills, pings = Inbox(), Inbox()
    watcher.subscribe(f"{topic_prefix}/will/#", wills)
    watcher.subscribe(f"{topic_prefix}/ping/#", pings)
    devices = [links(f"dev{i}-{topic_prefix}", will=(f"{topic_prefix}/will/{i}", b"gone")) for i in range(20)]
    try:
        watcher.start(timeout=10)
        for link in devices:
            link.subscribe(f"{topic_prefix}/cmd", lambda t, p: None)
            link.start(timeout=10)

        devices[3].kill()  # no goodbye: the broker publishes the will, the other links stay up
        assert wills.wait(lambda t, p: t.endswith("/will/3") and p == b"gone", timeout=10)
        assert not devices[3].connected and all(link.connected for i, link in enumerate(devices) if i != 3)

        broker.restart(down_seconds=1.0)
        alive = [link for i, link in enumerate(devices) if i != 3]
        end = time.monotonic() + 20
        while not (watcher.connected and all(link.connected for link in alive)) and time.monotonic() < end:
            time.sleep(0.1)
        assert watcher.connected and all(link.connected for link in alive)
        time.sleep(0.5)  # the SUBACKs of the resubscriptions
        for i, link in enumerate(alive):  # the watcher resubscribed: every device's message reaches it
            link.publish(f"{topic_prefix}/ping/{i}", b"up")
        assert pings.wait(lambda t, p: len(pings.payloads()) >= len(alive), timeout=10), len(pings.payloads())
    finally:
        for link in [watcher, *devices]:
            link.stop()
        links.close()
        broker.stop()
