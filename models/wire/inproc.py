"""An in-memory MQTT broker and its links: the simulator's `--transport inproc`.

The hub and the agents run unchanged over it (they only see the `Link` interface), so every
model, task and update is still a full encoded (signed/tagged) envelope that the receiver
decodes; only sockets and the broker process are gone. What it keeps of MQTT: `+`/`#`
wildcards, retained messages (an empty retained payload clears the topic) delivered to a new
subscription, the will on an abrupt end, persistent sessions (clean_session=False: messages
that arrive while the client is away wait for it), QoS 1 publishes queued while not connected,
and delivery on a dispatcher thread per client in publish order, so a handler never runs on the
publisher's stack. Torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from .transport import Handler

log = logging.getLogger("fedge.inproc")


class _Sent:
    """publish()'s receipt: the broker has taken the message when publish returns."""

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None


_SENT = _Sent()


@dataclass
class _Session:
    """What the broker keeps of a client between connections (clean_session=False)."""

    patterns: set[str] = field(default_factory=set)
    waiting: list[tuple[str, bytes]] = field(default_factory=list)


class InprocBroker:
    """One process's broker: topic routing, retained messages and sessions, under one lock so
    every subscriber sees messages in the order they were published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._online: dict[str, InprocLink] = {}
        self._sessions: dict[str, _Session] = {}

    def link(self, client_id: str, will: tuple[str, bytes] | None = None, clean_session: bool = False) -> InprocLink:
        """A LinkFactory: a new client of this broker."""
        return InprocLink(self, client_id, will=will, clean_session=clean_session)

    @property
    def url(self) -> str:
        return "inproc://"

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            return self._retained.get(topic)

    # -- called by links ---------------------------------------------------------------
    def _connect(self, link: InprocLink, patterns: list[str]) -> None:
        with self._lock:
            old = self._online.get(link.client_id)
            if old is not None and old is not link:
                old._drop(join=False)  # MQTT: a second connection with the same id takes over
            self._online[link.client_id] = link
            session = self._sessions.pop(link.client_id, None)
            if session is not None and not link.clean_session:
                for topic, payload in session.waiting:
                    link._deliver(topic, payload)
            for pattern in patterns:
                self._add_subscription(link, pattern)

    def _disconnect(self, link: InprocLink, will: bool) -> None:
        with self._lock:
            if self._online.get(link.client_id) is not link:
                return
            del self._online[link.client_id]
            if not link.clean_session:
                self._sessions[link.client_id] = _Session(set(link._patterns()))
        if will and link.will is not None:
            self.publish(link.will[0], link.will[1], qos=1, retain=True)

    def _add_subscription(self, link: InprocLink, pattern: str) -> None:
        """Caller holds the lock. Retained messages matching the new subscription go out now."""
        for topic, payload in self._retained.items():
            if topic_matches_sub(pattern, topic):
                link._deliver(topic, payload)

    def subscribe(self, link: InprocLink, pattern: str) -> None:
        with self._lock:
            if self._online.get(link.client_id) is link:
                self._add_subscription(link, pattern)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to a wildcard topic {topic!r}")
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            for link in self._online.values():
                if link._matches(topic):
                    link._deliver(topic, payload)
            if qos > 0:
                for session in self._sessions.values():
                    if any(topic_matches_sub(p, topic) for p in session.patterns):
                        session.waiting.append((topic, payload))


_Item = Callable[[], None] | tuple[str, bytes] | None  # a hook, a message, or None: stop


class InprocLink:
    """A client of an InprocBroker with MqttLink's interface (see fedge.models.wire.transport.Link)."""

    def __init__(self, broker: InprocBroker, client_id: str, will: tuple[str, bytes] | None = None,
                 clean_session: bool = False) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.clean_session = clean_session
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._subs_lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._outbox: list[tuple[str, bytes, int, bool]] = []  # QoS>0 publishes while not connected
        self._inbox: queue.Queue[_Item] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` (on the dispatcher thread) after every connect, after subscribing."""
        self._hooks.append(hook)

    def start(self, timeout: float = 20.0) -> InprocLink:
        """Connect: as with MQTT, the on-connect hooks run before any delivered message is handled,
        and the subscriptions are in place before the hooks publish."""
        self._inbox = queue.Queue()
        for hook in self._hooks:
            self._inbox.put(hook)
        with self._subs_lock:
            patterns = list(self._subs)
        self.broker._connect(self, patterns)
        self._connected.set()
        outbox, self._outbox = self._outbox, []
        for topic, payload, qos, retain in outbox:
            self.broker.publish(topic, payload, qos, retain)
        self._thread = threading.Thread(target=self._dispatch, args=(self._inbox,), daemon=True,
                                        name=f"inproc-{self.client_id}")
        self._thread.start()
        return self

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Optionally publish a last retained message, then disconnect (no will)."""
        if final is not None and self._connected.is_set():
            self.broker.publish(final[0], final[1], qos=1, retain=True)
        self._end(will=False)

    def kill(self) -> None:
        """End without a goodbye (a device dying): queued messages are dropped and the will fires."""
        self._end(will=True)

    def _end(self, will: bool) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        self.broker._disconnect(self, will=will)
        self._drop()

    def _drop(self, join: bool = True) -> None:
        self._connected.clear()
        inbox = self._inbox
        while True:  # what was not yet handled is lost, as with a closed socket
            try:
                inbox.get_nowait()
            except queue.Empty:
                break
        inbox.put(None)
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- pub/sub -----------------------------------------------------------------------
    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        with self._subs_lock:
            self._subs[topic] = (qos, handler)
        self.broker.subscribe(self, topic)

    def unsubscribe(self, topic: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic, None)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Sent:
        """Hand the message to the broker; while not connected a QoS>0 message waits for start()."""
        if not self._connected.is_set():
            if qos > 0:
                self._outbox.append((topic, bytes(payload), qos, retain))
            return _SENT
        self.broker.publish(topic, bytes(payload), qos, retain)
        return _SENT

    # -- delivery ----------------------------------------------------------------------
    def _patterns(self) -> list[str]:
        with self._subs_lock:
            return list(self._subs)

    def _matches(self, topic: str) -> bool:
        return any(topic_matches_sub(p, topic) for p in self._patterns())

    def _deliver(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _dispatch(self, inbox: queue.Queue[_Item]) -> None:
        """The link's network thread: hooks and messages in order, never on a publisher's stack."""
        while True:
            item = inbox.get()
            if item is None:
                return
            if not isinstance(item, tuple):
                try:
                    item()
                except Exception:  # noqa: BLE001 - a hook must not kill the dispatcher
                    log.exception("%s: on-connect hook failed", self.client_id)
                continue
            topic, payload = item
            with self._subs_lock:
                subs = list(self._subs.items())
            for pattern, (_, handler) in subs:
                if topic_matches_sub(pattern, topic):
                    try:
                        handler(topic, payload)
                    except Exception:  # noqa: BLE001 - never let a bad message kill the dispatcher
                        log.exception("%s: handler for %s failed", self.client_id, topic)
                    break
