"""What an MQTT link received in a test, a way to wait for a message without sleeping, and a
plain paho client for tests that play a device or a hub by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fedge.models.wire.transport import BrokerConfig


class Inbox:
    """A subscription handler that keeps every (topic, payload) and wakes waiters."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[str, bytes], bool], timeout: float = 10.0) -> bool:
        """True once a received message satisfies `predicate`, False after `timeout` seconds."""
        end = time.monotonic() + timeout
        with self._cond:
            while not any(predicate(t, p) for t, p in self.items):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> bool:
        return self.wait(lambda _topic, p: p == payload, timeout)

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [p for _, p in self.items]


def raw_client(url: str) -> mqtt.Client:
    """A bare paho client, connected and looping, outside fedge's link (no fedge behaviour in the way)."""
    cfg = BrokerConfig.from_url(url)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client.connect(cfg.host, cfg.port)
    client.loop_start()
    return client
