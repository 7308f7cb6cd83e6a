"""One network thread for many MQTT clients: the fleet simulator's 1,000 devices in one process.

paho's `loop_start` gives every client its own thread, two extra sockets and a `select()` call,
which cannot watch a file descriptor above 1023: a process stops connecting new clients at
about 340 of them (measured, docs/benchmarks.md "1,000 devices"). An `MqttLoop` drives any
number of paho clients from one thread through paho's external-loop interface (`loop_read`,
`loop_write`, `loop_misc` and the socket callbacks) over an epoll selector, and owns what
paho's own loop did for a client: the first connect, reconnects with backoff (with jitter, so a
restarted broker is not hit by every client in the same millisecond), keepalive pings.

Threading contract: every paho callback of a client (its messages, in arrival order) runs on
the loop's thread; a handler that blocks stalls every client of the loop, so handlers hand long
work to other threads (the agent's training pool). Publishing and subscribing from other
threads is safe (paho queues the packet; the loop is woken to write it). Torch-free.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("fedge.mqtt")

MIN_DELAY_S = 1.0  # first reconnect wait; doubles on every failure, reset by a successful CONNACK
MAX_DELAY_S = 30.0
CONNECTS_PER_PASS = 16  # connect attempts per loop pass, so reads and writes go on during a storm
MISC_INTERVAL_S = 1.0  # how often every client's keepalive is checked


class _Member:
    """What the loop keeps of one client: its socket, whether to keep it connected, its backoff."""

    __slots__ = ("client", "on_connect_fail", "sock", "active", "delay", "gone", "scheduled")

    def __init__(self, client: mqtt.Client, on_connect_fail: Callable[[str], None]) -> None:
        self.client = client
        self.on_connect_fail = on_connect_fail
        self.sock: Any = None
        self.active = True  # keep it connected: reconnect after a loss
        self.delay = 0.0  # the next reconnect's wait (0: the first attempt)
        self.gone = threading.Event()  # detached and its socket closed
        self.scheduled = False  # a connect attempt is in the timer heap


class MqttLoop:
    """A selector thread serving many paho clients; `attach` a client after `connect_async`."""

    def __init__(self, name: str = "fedge-mqtt-loop") -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._requests: deque[Callable[[], None]] = deque()
        self._woken = False
        self._wake_lock = threading.Lock()
        self._members: dict[int, _Member] = {}  # id(client) -> member
        self._timers: list[tuple[float, int, _Member]] = []  # (when, seq, member): connect attempts
        self._seq = itertools.count()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- API (any thread) --------------------------------------------------------------
    def attach(self, client: mqtt.Client, on_connect_fail: Callable[[str], None]) -> None:
        """Serve `client` (already given its broker by `connect_async`) and connect it now;
        `on_connect_fail(reason)` hears of each TCP/TLS connect that failed before MQTT answered."""
        member = _Member(client, on_connect_fail)
        client.on_socket_open = lambda c, u, sock: self._on_loop(lambda: self._opened(member, sock))
        client.on_socket_close = lambda c, u, sock: self._on_loop(lambda: self._closed_sock(member, sock))
        client.on_socket_register_write = lambda c, u, sock: self._on_loop(lambda: self._want_write(member, sock, True))
        client.on_socket_unregister_write = lambda c, u, sock: self._on_loop(lambda: self._want_write(member, sock, False))

        def add() -> None:
            self._members[id(client)] = member
            self._schedule(member, 0.0)

        self._call(add)

    def reset_backoff(self, client: mqtt.Client) -> None:
        """The client is connected (CONNACK accepted): its next loss is retried after MIN_DELAY_S."""
        member = self._members.get(id(client))
        if member is not None:
            member.delay = 0.0

    def detach(self, client: mqtt.Client, close: bool = False, timeout: float = 3.0) -> None:
        """Stop reconnecting `client`. Its socket stays served until paho closes it (after a
        DISCONNECT the caller sent), or is closed at once with `close=True` (no goodbye: the
        broker publishes the will). Waits up to `timeout` s for the socket to be gone."""
        member = self._members.get(id(client))
        if member is None:
            return

        def drop() -> None:
            member.active = False
            if close and member.sock is not None:
                sock, member.sock = member.sock, None
                self._unregister(sock)
                try:
                    sock.close()
                except OSError:
                    pass
            if member.sock is None:
                self._forget(member)

        self._call(drop)
        if threading.current_thread() is not self._thread:
            member.gone.wait(timeout)

    def close(self) -> None:
        """End the thread (clients still attached are dropped without a goodbye)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    @property
    def clients(self) -> int:
        return len(self._members)

    # -- plumbing ----------------------------------------------------------------------
    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` now if on the loop thread (paho's callbacks mostly are), else on it soon."""
        if threading.current_thread() is self._thread:
            fn()
        else:
            self._call(fn)

    def _call(self, fn: Callable[[], None]) -> None:
        self._requests.append(fn)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send(b"x")
        except OSError:  # buffer full: the loop is awake anyway
            pass

    def _schedule(self, member: _Member, delay: float) -> None:
        if member.scheduled or not member.active:
            return
        member.scheduled = True
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), member))

    def _forget(self, member: _Member) -> None:
        self._members.pop(id(member.client), None)
        member.gone.set()

    def _unregister(self, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    # -- paho's socket callbacks (loop thread) -------------------------------------------
    def _opened(self, member: _Member, sock: Any) -> None:
        member.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, member)

    def _closed_sock(self, member: _Member, sock: Any) -> None:
        self._unregister(sock)
        if member.sock is sock:
            member.sock = None
        if member.active:
            member.delay = min(MAX_DELAY_S, member.delay * 2) if member.delay else MIN_DELAY_S
            self._schedule(member, member.delay * random.uniform(0.5, 1.0))
        else:
            self._forget(member)

    def _want_write(self, member: _Member, sock: Any, write: bool) -> None:
        if member.sock is not sock:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._sel.modify(sock, events, member)
        except (KeyError, ValueError, OSError):
            pass

    # -- the loop --------------------------------------------------------------------------
    def _connect(self, member: _Member) -> None:
        member.scheduled = False
        if not member.active or member.sock is not None:
            return
        try:
            member.client.reconnect()
        except Exception as exc:  # noqa: BLE001 - OSError (refused, TLS, DNS) and whatever a socket raises
            member.sock = None
            try:
                member.on_connect_fail(f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - a callback must not end the loop
                log.exception("%s: connect-fail callback failed", self.name)
            member.delay = min(MAX_DELAY_S, member.delay * 2) if member.delay else MIN_DELAY_S
            self._schedule(member, member.delay * random.uniform(0.5, 1.0))

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._closed.is_set():
            now = time.monotonic()
            timeout = max(0.0, min(next_misc, self._timers[0][0] if self._timers else next_misc) - now)
            try:
                events = self._sel.select(timeout)
            except OSError:  # a socket closed under the selector; its member is dropped below
                events = []
            for key, mask in events:
                member = key.data
                if member is None:
                    self._drain_wake()
                    continue
                self._serve(member, key.fileobj, mask)
            self._run_requests()
            now = time.monotonic()
            started = 0
            while self._timers and self._timers[0][0] <= now and started < CONNECTS_PER_PASS:
                self._connect(heapq.heappop(self._timers)[2])
                started += 1
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                for member in list(self._members.values()):
                    if member.sock is not None:
                        self._guard(member, member.client.loop_misc)
        for member in list(self._members.values()):  # closed: drop what is left
            if member.sock is not None:
                self._unregister(member.sock)
                try:
                    member.sock.close()
                except OSError:
                    pass
            member.gone.set()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, member: _Member, sock: Any, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._guard(member, member.client.loop_read)
            # TLS: bytes already decrypted into the SSL object are invisible to the selector
            while member.sock is sock and getattr(sock, "pending", lambda: 0)() > 0:
                if self._guard(member, member.client.loop_read):
                    break
        if mask & selectors.EVENT_WRITE and member.sock is sock:
            self._guard(member, member.client.loop_write)

    def _guard(self, member: _Member, step: Callable[[], Any]) -> Any:
        """One paho step; an exception it raises (a callback paho did not catch) is logged, the
        loop goes on. Returns the step's result code (truthy: an error)."""
        try:
            return step()
        except Exception:  # noqa: BLE001 - one client's failure must not stop the others
            log.exception("%s: network step of %s failed", self.name, member.client._client_id.decode(errors="replace"))
            return 1

    def _drain_wake(self) -> None:
        """Empty the wake socket, then accept new wake-ups: a request queued before the flag is
        cleared is run in this pass (requests run after), one queued after it wakes the loop again."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._wake_lock:
            self._woken = False

    def _run_requests(self) -> None:
        while self._requests:
            fn = self._requests.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("%s: request failed", self.name)
