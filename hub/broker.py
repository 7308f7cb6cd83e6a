"""An MQTT broker inside this process (amqtt), so a demo fleet needs no Mosquitto.

amqtt is asyncio-based; it runs on its own event loop in a daemon thread so the rest of
fedge (paho clients, torch training) stays synchronous.

A quirk of amqtt 0.12 that this module does not change: a client that connects is also sent the
retained messages matching *other* clients' subscriptions. fedge's links pass on only topics they
subscribed to (models/wire/transport.py), so the hub and the agents never see them; a bare test
client that records everything does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from amqtt.broker import Broker

log = logging.getLogger("fedge.broker")


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """amqtt 0.12 iterates its subscription table across `await`s (retained messages for a
    resumed session, broadcasts), so a client that subscribes meanwhile raises "dictionary
    changed size during iteration" in the broker and loses its session. Every iteration here
    walks a snapshot instead."""

    def __iter__(self):  # noqa: ANN204
        return iter(list(super().keys()))

    def keys(self):  # noqa: ANN201
        return list(super().keys())

    def values(self):  # noqa: ANN201
        return list(super().values())

    def items(self):  # noqa: ANN201
        return list(super().items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (tests and the fleet pick one per run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """Start/stop an amqtt broker on 127.0.0.1:<port> from synchronous code."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._broker = Broker(config, loop=loop)
                self._broker._subscriptions = _SnapshotDict(self._broker._subscriptions)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fedge-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"embedded broker did not start on port {self.port} within {timeout}s")
        if errors:
            raise RuntimeError(f"embedded broker failed to start on port {self.port}: {errors[0]}")
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("embedded broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = None
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
