"""The embedded broker (amqtt) under the connect storm a simulated fleet makes: many clients
resuming persistent sessions while others subscribe. amqtt 0.12 iterated its subscription table
across awaits and dropped sessions ("dictionary changed size during iteration"); fedge's
EmbeddedBroker walks snapshots. Without that fix this test fails on most runs."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from fedge.hub.broker import EmbeddedBroker

CLIENTS, TOPICS = 40, 20


def _client(broker: EmbeddedBroker, i: int, on_connect, on_message=None, on_subscribe=None) -> mqtt.Client:  # noqa: ANN001
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"storm-{i}", clean_session=False)
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _storm(make) -> list[mqtt.Client]:  # noqa: ANN001
    out: list[mqtt.Client] = []
    threads = [threading.Thread(target=lambda i=i: out.append(make(i))) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_sessions_survive_a_connect_storm(caplog) -> None:  # noqa: ANN001
    broker = EmbeddedBroker().start()
    try:
        pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="storm-pub")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for j in range(TOPICS):
            pub.publish(f"storm/r{j}", b"x", qos=1, retain=True).wait_for_publish(5)
        got = {i: set() for i in range(CLIENTS)}
        full = {i: threading.Event() for i in range(CLIENTS)}

        def on_message(i: int):  # noqa: ANN202
            def handle(client, userdata, msg) -> None:  # noqa: ANN001
                got[i].add(msg.topic)
                if len(got[i]) == TOPICS:
                    full[i].set()
            return handle

        first = _storm(lambda i: _client(broker, i, lambda c, *_: c.subscribe([(f"storm/r{j}", 1) for j in range(TOPICS)]),
                                         on_message(i)))
        assert all(e.wait(30) for e in full.values()), {i: len(v) for i, v in got.items() if len(v) < TOPICS}
        for c in first:
            c.disconnect()
            c.loop_stop()
        # every client comes back on its persistent session while the others subscribe
        acked = {i: threading.Event() for i in range(CLIENTS)}
        second = _storm(lambda i: _client(broker, i, lambda c, *_, i=i: c.subscribe(f"storm/u{i}", 1),
                                          on_subscribe=lambda *_, i=i: acked[i].set()))
        try:
            missing = [i for i, e in acked.items() if not e.wait(30)]
            assert not missing, f"sessions lost in the storm: {missing}"
        finally:
            for c in second:
                c.disconnect()
                c.loop_stop()
            pub.loop_stop()
    finally:
        broker.stop()
    assert "dictionary changed size" not in caplog.text
