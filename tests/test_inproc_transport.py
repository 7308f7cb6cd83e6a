"""The in-memory transport keeps the MQTT semantics the hub and agents rely on: wildcards,
retained messages delivered on subscribe (and cleared by an empty payload), the will on an
abrupt end but not on a clean stop, persistent sessions, and delivery in publish order on the
subscriber's own thread."""

from __future__ import annotations

import threading

import pytest

from fedge.models.wire.inproc import InprocBroker

from .inbox import Inbox


def _first(inbox: Inbox, n: int) -> list[tuple[str, bytes]]:
    """The first n messages received (fails after a few seconds without them)."""
    assert inbox.wait(lambda *_: len(inbox.items) >= n, timeout=5), f"only {len(inbox.items)} of {n} messages"
    return inbox.items[:n]


def test_retained_messages_reach_a_late_subscriber_through_wildcards():
    broker = InprocBroker()
    pub = broker.link("pub").start()
    pub.publish("f/model", b"m1", retain=True)
    pub.publish("f/round", b"r1", retain=True)
    pub.publish("f/dev/a/status", b"online", retain=True)
    pub.publish("f/dev/b/status", b"online", retain=True)
    pub.publish("f/dev/b/status", b"", retain=True)  # an empty retained payload clears the topic
    pub.publish("f/news", b"not retained")
    sub = broker.link("sub")
    inbox = Inbox()
    sub.subscribe("f/dev/+/status", inbox)
    sub.subscribe("f/+", inbox)
    sub.start()
    got = _first(inbox, 3)
    assert sorted(got) == [("f/dev/a/status", b"online"), ("f/model", b"m1"), ("f/round", b"r1")]
    pub.publish("f/dev/c/status", b"x")
    pub.publish("g/other", b"y")  # matches no subscription
    assert _first(inbox, 4)[-1] == ("f/dev/c/status", b"x")
    sub.stop()
    pub.stop()


def test_the_will_fires_on_a_crash_not_on_a_clean_stop():
    broker = InprocBroker()
    watcher = broker.link("watcher").start()
    inbox = Inbox()
    watcher.subscribe("dev/+/status", inbox)
    a = broker.link("a", will=("dev/a/status", b"offline")).start()
    b = broker.link("b", will=("dev/b/status", b"offline")).start()
    b.stop(final=("dev/b/status", b"bye"))
    a.kill()
    got = _first(inbox, 2)
    assert got == [("dev/b/status", b"bye"), ("dev/a/status", b"offline")]
    assert broker.retained("dev/a/status") == b"offline" and broker.retained("dev/b/status") == b"bye"
    assert not a.connected and not b.connected


def test_order_thread_and_persistent_session():
    """Messages arrive in publish order on the subscriber's dispatcher thread; a client with a
    persistent session gets what was published while it was away, and QoS 1 publishes made
    before start() go out on connect."""
    broker = InprocBroker()
    hub = broker.link("hub", clean_session=False)
    threads: set[str] = set()
    inbox = Inbox()

    def handler(topic: str, payload: bytes) -> None:
        threads.add(threading.current_thread().name)
        inbox(topic, payload)

    hub.subscribe("up/+", handler)
    hub.start()
    dev = broker.link("dev")
    dev.publish("up/dev", b"queued before connect", qos=1)
    dev.start()
    for i in range(50):
        dev.publish("up/dev", str(i).encode())
    got = _first(inbox, 51)
    assert [p for _, p in got] == [b"queued before connect"] + [str(i).encode() for i in range(50)]
    assert threads == {"inproc-hub"}  # never the publisher's (this test's) thread
    hub.stop()
    dev.publish("up/dev", b"while away")
    hub.start()
    assert _first(inbox, 52)[-1] == ("up/dev", b"while away")
    hub.stop()
    dev.stop()


def test_publishing_to_a_wildcard_is_refused():
    link = InprocBroker().link("x").start()
    with pytest.raises(ValueError, match="wildcard"):
        link.publish("a/+", b"")
    link.stop()
