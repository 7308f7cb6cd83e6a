"""Replay protection on the device: accept a hub message only if it is not older than the
newest (epoch, run, version) this device has accepted for its fleet.

A signature proves who wrote a message, not when; a recorded signed model or task of an
earlier run stays valid forever. Every model and task header therefore carries the run's
`epoch`: an integer the hub allocates once per run, strictly increasing across runs (and
kept by a resumed run). Ordering rule (docs/protocol.md, "Run binding and replay"):

- a higher epoch is a newer run: accepted (this is how a new run is announced; a replay
  cannot raise the epoch without the hub's key);
- a lower epoch is an earlier run: refused;
- the same epoch must name the same run id, and the version may not go back.

The newest accepted position is kept in a small JSON file (keyed by fleet) so it survives
a restart. Torch-free: the inference follower uses it too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .envelope import EnvelopeError

log = logging.getLogger("fedge.freshness")


class StaleMessage(EnvelopeError):
    """A correctly signed hub message that is older than what this device already accepted."""


@dataclass(frozen=True)
class Position:
    """Where a message sits in the fleet's history: the run's epoch, its id, a model version."""

    epoch: int
    run: str
    version: int

    @classmethod
    def of(cls, msg: Any) -> Position:
        """The position of a ModelMessage (its version) or TaskMessage (the model version it trains)."""
        version = msg.version if hasattr(msg, "version") else msg.model_version
        return cls(int(msg.epoch), str(msg.run), int(version))

    def as_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "run": self.run, "version": self.version}


def order_reason(newest: Position | None, msg: Position) -> str | None:
    """Why `msg` must be refused after `newest` was accepted; None if it may be accepted."""
    if newest is None or msg.epoch > newest.epoch:
        return None
    if msg.epoch < newest.epoch:
        return (f"run {msg.run!r} has epoch {msg.epoch}, older than the newest accepted run "
                f"{newest.run!r} (epoch {newest.epoch}): a replay of an earlier run")
    if msg.run != newest.run:
        return f"run {msg.run!r} claims epoch {msg.epoch}, which belongs to run {newest.run!r}"
    if msg.version < newest.version:
        return (f"model version {msg.version} of run {msg.run!r} is older than the accepted "
                f"version {newest.version}: a replay")
    return None


class RunGuard:
    """The newest accepted Position of one fleet, optionally persisted in `path`.

    `admit` checks and, when the message is newer, advances atomically (thread-safe), so a
    device calls it once per received model or task after the signature is verified.
    """

    def __init__(self, fleet: str, path: str | os.PathLike[str] | None = None) -> None:
        self.fleet = fleet
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self.refused = 0
        self.last_refusal: str | None = None
        self.newest: Position | None = self._load()

    def _load(self) -> Position | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            entry = json.loads(self.path.read_text()).get(self.fleet)
            if entry is None:
                return None
            pos = Position(int(entry["epoch"]), str(entry["run"]), int(entry["version"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EnvelopeError(
                f"replay-guard file {self.path} is unreadable ({exc}); it records the newest run this "
                "device accepted - fix or delete it (deleting re-opens replays of earlier runs once)") from None
        return pos

    def _save(self, pos: Position) -> None:
        if self.path is None:
            return
        try:
            data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(data, dict):
                data = {}
            data[self.fleet] = pos.as_json()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a temporary name of this process: agents started beside one data folder share the file
            tmp = self.path.with_suffix(f"{self.path.suffix}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except (OSError, ValueError) as exc:
            log.warning("could not persist the newest accepted run to %s: %s", self.path, exc)

    def check(self, pos: Position) -> str | None:
        """The refusal reason for `pos`, without advancing."""
        with self._lock:
            return order_reason(self.newest, pos)

    def admit(self, pos: Position) -> None:
        """Raise StaleMessage (and count it) if `pos` is older than the newest accepted;
        otherwise make it the newest (persisted when it moved forward)."""
        with self._lock:
            reason = order_reason(self.newest, pos)
            if reason is not None:
                self.refused += 1
                self.last_refusal = reason
                raise StaleMessage(reason)
            if pos != self.newest:
                self.newest = pos
                self._save(pos)

    def status(self) -> dict[str, Any]:
        return {"newest": self.newest.as_json() if self.newest else None, "refused": self.refused,
                "last_refusal": self.last_refusal}


def default_guard_path(beside: str | os.PathLike[str], role: str, fleet: str) -> Path:
    """The guard file a CLI uses when none is given: next to the device's key material (in it,
    when `beside` is a folder)."""
    path = Path(beside)
    return (path if path.is_dir() else path.parent) / f"fedge-{role}-seen-{fleet}.json"
