"""MQTT transport shared by agent and hub: broker URL, TLS/auth, persistent session, backoff.

One wrapper so both sides reconnect, resubscribe and queue QoS 1 publishes the same way.
`Link` is the interface the hub and the agent use; `MqttLink` honours it over a real broker
and `fedge.models.wire.inproc.InprocLink` in memory (the simulator's `--transport inproc`),
so both transports run the same hub and agent code. Torch-free (paho-mqtt only).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..errors import ConfigError
from .mqtt_loop import MqttLoop

log = logging.getLogger("fedge.mqtt")

Handler = Callable[[str, bytes], None]


class PublishInfo(Protocol):
    """What publish returns: lets a sender wait until a message has left (paho's MQTTMessageInfo)."""

    def wait_for_publish(self, timeout: float | None = None) -> None: ...


class Link(Protocol):
    """A client connection as the hub and the agent use it: MQTT topics with `+`/`#` wildcards,
    QoS and retained messages (delivered to a new subscriber), a will published when the client
    dies without saying goodbye, and handlers called on the link's own thread in arrival order."""

    client_id: str

    def on_connect(self, hook: Callable[[], None]) -> None: ...

    def start(self, timeout: float = 20.0) -> Link: ...

    def stop(self, final: tuple[str, bytes] | None = None) -> None: ...

    def kill(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishInfo: ...


class LinkFactory(Protocol):
    """Builds a Link for one client: `MqttLink` over a BrokerConfig, or an in-memory broker's `link`."""

    def __call__(self, client_id: str, will: tuple[str, bytes] | None = None,
                 clean_session: bool = False) -> Link: ...


@dataclass
class BrokerConfig:
    """Where and how to connect. Built from `mqtt://[user[:pass]@]host[:port]` or `mqtts://...`."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> BrokerConfig:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parsed.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        tls = parsed.scheme in ("mqtts", "ssl")
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from None
        cfg = cls(
            host=parsed.hostname,
            port=port,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            tls=tls,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        if cfg.ca_file or cfg.cert_file:
            cfg.tls = True
        return cfg

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


# CONNACK refusals that retrying does not cure: unsupported protocol, client id not valid, bad user
# name or password, not authorized (MQTT 5 codes, to which paho maps the 3.1.1 return codes 1, 2, 4, 5).
# `start` fails on them at once; a reconnect later keeps retrying (the password file may be reloaded).
PERMANENT_REFUSALS = frozenset({132, 133, 134, 135})


# a connection dropped this soon after it was made, this many times in a row, gets a warning
QUICK_DROP_S = 5.0
QUICK_DROPS_TO_WARN = 3


class MqttLink:
    """A paho client with a persistent session, automatic reconnect and topic handlers.

    Subscriptions are re-sent on every (re)connect; QoS 1 messages published while the
    broker is away stay in paho's queue and go out after reconnect. The network runs on an
    `MqttLoop`: `loop` shares one among many links (the fleet simulator's devices); without
    it the link starts a loop of its own (a standalone agent or hub).
    """

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = False,
        max_queued: int = 0,
        loop: MqttLoop | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self._shared_loop = loop
        self._loop: MqttLoop | None = None  # the loop serving this link while started
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # the broker acknowledged every subscription of this connection
        self._pending_subacks: set[int] = set()
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._connected_at = 0.0
        self._quick_drops = 0  # disconnects in a row that came right after a connect
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.client.max_queued_messages_set(max_queued)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set(
                ca_certs=config.ca_file,
                certfile=config.cert_file,
                keyfile=config.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_subscribe = self._handle_subscribe
        self.last_error: str | None = None
        self._refused = threading.Event()  # the broker answered the first connect with a permanent refusal
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------
    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` after every successful (re)connect, after resubscribing."""
        self._on_connect_hooks.append(hook)

    def start(self, timeout: float = 20.0) -> MqttLink:
        """Connect in the background (paho retries with backoff) and wait for the first CONNACK and
        the SUBACKs of the subscriptions made before start: a hub must not open a round before the
        broker routes updates to it."""
        end = time.monotonic() + timeout
        self._stopping = False
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self._loop = self._shared_loop or MqttLoop(name=f"fedge-mqtt-{self.client_id}")
        self._loop.attach(self.client, self._handle_connect_fail)
        while not self._connected.wait(0.05) and not self._refused.is_set() and time.monotonic() < end:
            pass
        if self._refused.is_set():  # retrying cannot help: fail now, with the broker's reason
            self._release(close=True)
            raise ConnectionError(f"{self.client_id}: {self.config.url} refused the login (check the username, the "
                                  f"password or FEDGE_MQTT_PASSWORD, and the broker's password file): {self.last_error}")
        if not (self._connected.is_set() and self._subscribed.wait(max(0.0, end - time.monotonic()))):
            self._release(close=True)
            reason = f": {self.last_error}" if self.last_error else ""
            raise ConnectionError(f"{self.client_id}: no connection to {self.config.url} within {timeout}s{reason}")
        return self

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Optionally publish a last retained message (e.g. 'offline'), then disconnect."""
        if final is not None and self._connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                pass
        self._stopping = True
        self.client.disconnect()  # the loop sends DISCONNECT, then paho closes the socket
        self._release(close=False)
        self._connected.clear()

    def kill(self) -> None:
        """Drop the connection without a goodbye (a device dying): the broker publishes the will."""
        self._stopping = True
        self._release(close=True)
        self._connected.clear()

    def _release(self, close: bool) -> None:
        """Take the client off its loop (closing its socket at once with `close`), and end the
        loop if it was this link's own."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.detach(self.client, close=close)
        if loop is not self._shared_loop:
            loop.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- pub/sub ---------------------------------------------------------------------
    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        self._subs[topic] = (qos, handler)
        if self._connected.is_set():
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        if self._subs.pop(topic, None) is not None and self._connected.is_set():
            self.client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish; while disconnected a QoS>0 message is queued and sent after reconnect."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho callbacks --------------------------------------------------------------
    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        if reason_code.is_failure:
            self.last_error = str(reason_code)
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            if reason_code.value in PERMANENT_REFUSALS:
                self._refused.set()
            return
        self._subscribed.clear()
        with self._lock:
            self._pending_subacks = set()
            for topic, (qos, _) in list(self._subs.items()):
                mid = client.subscribe(topic, qos)[1]
                if mid is not None:
                    self._pending_subacks.add(mid)
            if not self._pending_subacks:
                self._subscribed.set()
        self._connected_at = time.monotonic()
        if self._loop is not None:
            self._loop.reset_backoff(client)
        self._connected.set()
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook must not kill paho's thread
                log.exception("%s: on-connect hook failed", self.client_id)

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                          properties: Any = None) -> None:
        with self._lock:
            self._pending_subacks.discard(mid)
            if not self._pending_subacks:
                self._subscribed.set()

    def _handle_connect_fail(self, detail: str = "") -> None:
        """TCP or TLS failed before MQTT could answer (wrong port, CA or host name)."""
        self.last_error = f"could not open {'a TLS' if self.config.tls else 'a TCP'} connection to {self.config.url}" + (
            " (check the CA file, the broker's certificate host name and that the port speaks TLS)"
            if self.config.tls else "") + (f" [{detail}]" if detail else "")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        if self._connected.is_set() and not self._stopping:
            log.info("%s: disconnected (%s); reconnecting with backoff", self.client_id, reason_code)
            quick = time.monotonic() - self._connected_at < QUICK_DROP_S
            self._quick_drops = self._quick_drops + 1 if quick else 0
            if self._quick_drops == QUICK_DROPS_TO_WARN:  # two clients with one id take the session from each other
                log.warning("%s: the broker dropped this connection right after %d connects in a row: is another "
                            "client using the id %r? MQTT client ids (fedge device ids) must be unique",
                            self.client_id, self._quick_drops, self.client_id)
        self._connected.clear()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for pattern, (_, handler) in list(self._subs.items()):
            if mqtt.topic_matches_sub(pattern, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload))
                except Exception:  # noqa: BLE001 - never let a bad message kill the network loop
                    log.exception("%s: handler for %s failed", self.client_id, msg.topic)
                return


def make_link(broker: BrokerConfig | LinkFactory, client_id: str, will: tuple[str, bytes] | None = None,
              clean_session: bool = False) -> Link:
    """The hub's and the agent's one way to get a connection: MQTT for a BrokerConfig, else the factory's."""
    if isinstance(broker, BrokerConfig):
        return MqttLink(broker, client_id, will=will, clean_session=clean_session)
    return broker(client_id, will=will, clean_session=clean_session)


class SharedLoopLinks:
    """A LinkFactory of MqttLinks that all run on one `MqttLoop` (one network thread, one socket
    each): how the fleet simulator gives 1,000 virtual devices their own MQTT connections."""

    def __init__(self, config: BrokerConfig, loop: MqttLoop | None = None) -> None:
        self.config = config
        self.loop = loop or MqttLoop(name="fedge-mqtt-shared")

    def __call__(self, client_id: str, will: tuple[str, bytes] | None = None, clean_session: bool = False) -> MqttLink:
        return MqttLink(self.config, client_id, will=will, clean_session=clean_session, loop=self.loop)

    def close(self) -> None:
        """End the loop: call after every link on it has stopped."""
        self.loop.close()
