"""fedge on a second broker implementation: RabbitMQ's MQTT plugin, a private node per module
(tests/rabbitmq_proc.py; the machine's own RabbitMQ, if any, is never touched).

RabbitMQ differs from Mosquitto where fedge leans on the broker: it sends no retained message
to a subscription with a wildcard (the hub reads `dev/+/status`), so a hub that starts after
its devices learns of them only because each device announces again when the hub says it is
online (edge_agent/agent.py `_on_hub_status`; Fleet starts its devices before its hub, so every
run here depends on it). Retained messages on exact topics, wills and persistent sessions
(QoS 1) are checked as fedge uses them. docs/operations.md "Broker clusters" has the rest.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedge.edge_agent.agent import Agent
from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.partition import PartitionSpec
from fedge.models.wire import Topics, decode
from fedge.models.wire.messages import parse_model, parse_status, status_payload
from fedge.models.wire.transport import BrokerConfig, MqttLink

from .conftest import skip_or_fail
from .inbox import Inbox, raw_client


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    """A private RabbitMQ node with the MQTT plugin; skipped (failed under FEDGE_REQUIRE_ALL) if
    rabbitmq-server is missing or the node does not start."""
    from .rabbitmq_proc import RabbitMQProcess, rabbitmq_server_script

    if rabbitmq_server_script() is None:
        skip_or_fail("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    node = RabbitMQProcess(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
    except RuntimeError as exc:
        skip_or_fail(f"a private RabbitMQ node did not start: {exc}")
    yield node
    node.stop()


def _fleet(url: str, prefix: str, tmp_path, data, devices: int, rounds: int, **hub_kw) -> Fleet:
    hub = HubConfig(fleet="rmq", prefix=prefix, model="mlp", rounds=rounds, deadline_s=20,
                    train={"lr": 0.05, "batch_size": 32, "epochs": 1}, **hub_kw)
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


def _online(hub, device: str) -> bool | None:
    return next((d["online"] for d in hub.status()["devices"] if d["id"] == device), None)


@pytest.mark.slow  # with the node's start (10-15 s on a busy 2-core machine), about 25 s
def test_fleet_learns_over_rabbitmq_with_a_crash_and_a_late_device(rabbitmq, topic_prefix, tmp_path, small_data):
    """4 devices, 3 rounds. After round 1 one device dies: its will tells the hub, which goes on
    without it. After the run a device that connects late gets the retained model and task."""
    fleet = _fleet(rabbitmq.url, topic_prefix, tmp_path, small_data, devices=4, rounds=3)
    with fleet:
        victim = fleet.agents[3]
        seen_offline: list[bool] = []

        def crash_after_round_1(record: dict) -> None:  # on the hub's loop thread, before round 2 opens
            if record["round"] == 1:
                hub.config.min_devices = 3  # round 1 waited for all four
                victim.crash()
                end = time.monotonic() + 15
                while _online(hub, victim.device_id) and time.monotonic() < end:
                    time.sleep(0.05)
                seen_offline.append(_online(hub, victim.device_id) is False)

        hub = fleet.make_hub(on_round=crash_after_round_1)
        history = hub.run()
        accuracy = hub.metrics(hub.global_state, full=True)["accuracy"]

        # a device that connects after the run: the retained task (finished) reaches a real agent,
        # the retained final model and the victim's retained will reach a plain subscriber
        topics = Topics("rmq", topic_prefix)
        late = Agent("late", victim.profile, BrokerConfig.from_url(rabbitmq.url), topics, small_data.train.subset(np.arange(64)),
                     num_classes=10, pool=fleet.pool, warn_unverified=False).start()
        assert late.finished.wait(10), "the retained finished task did not reach a device that connected late"
        late.stop()
        inbox = Inbox()
        reader = MqttLink(BrokerConfig.from_url(rabbitmq.url), "fedge-test-late-reader", clean_session=True)
        reader.subscribe(topics.model, inbox)
        reader.subscribe(topics.device_status(victim.device_id), inbox)
        reader.start()
        try:
            assert inbox.wait(lambda t, _p: t == topics.model), "no retained model for a late subscriber"
            assert inbox.wait(lambda t, _p: t == topics.device_status(victim.device_id)), "no retained will"
        finally:
            reader.stop()
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[0]["participants"] == ["dev000", "dev001", "dev002", "dev003"]
    assert seen_offline == [True], "the hub did not see the crashed device's will ('offline') within 15 s"
    for rec in history[1:]:  # not selected once it is offline: the rounds never wait for it
        assert rec["participants"] == rec["selected"] == ["dev000", "dev001", "dev002"], rec
    assert accuracy > 0.5, accuracy  # chance is 0.10
    model = parse_model(decode(dict(inbox.items)[topics.model]))
    assert (model.run, model.version) == (hub.run_id, 3)
    assert parse_status(dict(inbox.items)[topics.device_status(victim.device_id)])["state"] == "offline"


def test_an_update_sent_while_the_hub_is_away_waits_in_its_session(rabbitmq, topic_prefix):
    """The hub's persistent session (clean session false, QoS 1): what a device publishes while
    the hub is disconnected is queued by the broker and delivered when the hub reconnects."""
    topics = Topics("rmq", topic_prefix)
    config = BrokerConfig.from_url(rabbitmq.url)
    hub_id = f"fedge-hub-rmq-{topic_prefix.rsplit('/', 1)[-1][:8]}"
    first = Inbox()
    hub = MqttLink(config, hub_id, clean_session=False)
    hub.subscribe(topics.all_device_updates, first)
    hub.start()
    hub.stop()  # a clean disconnect: the session (its queue and subscription) stays
    update = bytes(range(256)) * 4096  # 1 MiB, the size of an MLP update
    device = MqttLink(config, "fedge-dev-rmq-d1")
    device.start()
    device.publish(topics.device_update("d1"), update, qos=1).wait_for_publish(10)  # the broker has it
    device.stop()
    second = Inbox()
    back = MqttLink(config, hub_id, clean_session=False)
    back.subscribe(topics.all_device_updates, second)
    back.start()
    try:
        assert second.wait(lambda t, p: t == topics.device_update("d1") and p == update, timeout=10), \
            "the update published while the hub was away was not delivered after it reconnected"
    finally:
        back.stop()
    assert first.items == []


def test_the_rabbitmq_behaviours_operations_md_describes(rabbitmq, topic_prefix):
    """What docs/operations.md "Broker clusters" says of this RabbitMQ, checked on it: a retained
    message of a Conv-4 model's size (8 MiB) reaches an exact subscription, none reaches a
    wildcard one (the reason for the hub-online re-announcement), and a '.' in a topic splits
    the level (so fleet ids, device ids and prefixes with dots do not work on RabbitMQ)."""
    base = f"{topic_prefix}/rmqdoc"
    publisher = raw_client(rabbitmq.url)
    exact, wildcard, dotted = Inbox(), Inbox(), Inbox()
    readers = []
    try:
        model = b"M" * (8 * 2**20)
        publisher.publish(f"{base}/model", model, qos=1, retain=True).wait_for_publish(30)
        publisher.publish(f"{base}/dev/d1/status", b"online", qos=1, retain=True).wait_for_publish(10)
        for inbox, topic in ((exact, f"{base}/model"), (wildcard, f"{base}/dev/+/status"),
                             (dotted, f"{base}/dev/+/update")):
            link = MqttLink(BrokerConfig.from_url(rabbitmq.url), f"fedge-test-doc-{len(readers)}", clean_session=True)
            link.subscribe(topic, inbox)
            readers.append(link.start())
        assert exact.wait(lambda _t, p: p == model, timeout=30), "no retained 8 MiB message on an exact subscription"
        publisher.publish(f"{base}/dev/x.y/update", b"dotted", qos=1).wait_for_publish(10)
        publisher.publish(f"{base}/dev/xy/update", b"plain", qos=1).wait_for_publish(10)
        assert dotted.wait_for(b"plain")
        time.sleep(0.5)
        assert wildcard.items == [], "RabbitMQ now sends retained messages to wildcard subscriptions: update the docs"
        assert dotted.payloads() == [b"plain"], "a '.' in a topic no longer splits the level: update the docs"
    finally:
        for link in readers:
            link.stop()
        for topic in (f"{base}/model", f"{base}/dev/d1/status"):
            publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear
        publisher.loop_stop()
        publisher.disconnect()


def test_a_device_announces_again_when_the_hub_comes_online(embedded_broker, topic_prefix, small_data):
    """Broker-neutral half of the RabbitMQ fix, on the embedded broker: a hub status `online`
    (each hub (re)connect publishes one) makes a running agent publish its status again, so a
    hub whose wildcard subscription got no retained statuses still learns who is there."""
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile

    topics = Topics("rmq", topic_prefix)
    config = BrokerConfig.from_url(embedded_broker)
    pool = TrainingPool(workers=1, threads_per_worker=1, device="cpu")
    agent = Agent("d1", load_profile("sim"), config, topics, small_data.train.subset(np.arange(64)), num_classes=10,
                  pool=pool, warn_unverified=False).start()
    statuses = Inbox()
    watcher = MqttLink(config, "fedge-test-watcher", clean_session=True)
    watcher.subscribe(topics.device_status("d1"), statuses)
    watcher.start()
    hub = raw_client(embedded_broker)
    try:
        assert statuses.wait(lambda _t, p: parse_status(p)["state"] == "online")
        before = len(statuses.items)
        hub.publish(topics.hub_status, status_payload("online", role="hub", run="r1"), qos=1, retain=True)
        assert statuses.wait(lambda _t, _p: len(statuses.items) > before), "no new announcement"
        assert parse_status(statuses.items[-1][1])["num_samples"] == 64
        count = len(statuses.items)
        hub.publish(topics.hub_status, status_payload("offline", role="hub", run="r1"), qos=1, retain=True)
        time.sleep(1.0)
        assert len(statuses.items) == count  # the hub going away asks for nothing
    finally:
        hub.publish(topics.hub_status, b"", qos=1, retain=True)  # clear the retained topic
        hub.loop_stop()
        hub.disconnect()
        watcher.stop()
        agent.stop()
        pool.close()
