"""The model being served and the follower that swaps in each new global model from the hub
(rebuilt torch-free by models.onnx_graph), refusing replays and rollbacks."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.models.errors import FedgeError
from fedge.models.wire.envelope import EnvelopeError
from fedge.models.wire.freshness import Position, RunGuard, StaleMessage
from fedge.models.wire.topics import ROOT, Topics
from fedge.models.wire.transport import BrokerConfig, MqttLink

from .predictor import InferenceError, Predictor

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("fedge.infer")
UNTRAINED_VERSION = 0  # a run's model before its first round: the seeded initialisation, never served


class NoModelYet(FedgeError, RuntimeError):
    """Raised by LiveModel.get() before the first model arrived."""


class LiveModel:
    """The model being served. Readers take a reference and run on it without a lock held,
    so a swap never blocks or breaks an in-flight prediction (ORT sessions are thread-safe)."""

    def __init__(self, predictor: Predictor | None = None) -> None:
        self._lock = threading.Lock()
        self._predictor = predictor
        self.swaps = 0
        self.swapped_at: float | None = time.time() if predictor else None
        self.changed = threading.Condition(self._lock)

    def get(self) -> Predictor:
        with self._lock:
            pred = self._predictor
        if pred is None:
            raise NoModelYet("no model loaded yet: waiting for the hub to publish one")
        return pred

    def peek(self) -> Predictor | None:
        with self._lock:
            return self._predictor

    def swap(self, predictor: Predictor) -> Predictor | None:
        with self._lock:
            old, self._predictor = self._predictor, predictor
            self.swaps += 1
            self.swapped_at = time.time()
            self.changed.notify_all()
        return old

    def wait_for(self, predicate, timeout: float) -> bool:  # noqa: ANN001
        """Block until predicate(predictor or None) is true (tests, scripts)."""
        end = time.time() + timeout
        with self._lock:
            while not predicate(self._predictor):
                left = end - time.time()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def status(self) -> dict[str, Any]:
        pred = self.peek()
        return {"ready": pred is not None, "swaps": self.swaps, "swapped_at": self.swapped_at,
                "model": pred.describe() if pred else None}


class ModelFollower:
    """Swaps every new global model from the hub into a LiveModel.

    Accepts a model only in the order of models/wire/freshness.py: a newer run (higher epoch)
    or a higher version of the current run; an earlier run or an older version is refused as a
    replay (counted, reason in status), the same version again is ignored (the retained message
    re-delivered after a reconnect). Version 0 of a run, its untrained initial model, is never
    served: the previous model keeps serving until the run's first trained version. `guard_file`
    keeps the newest accepted (epoch, run, version) across restarts. With `verifier`, only models
    signed by the hub's Ed25519 key are accepted. A message that fails to decode, verify or build
    is logged and counted; the previous model keeps serving. `templates`: a folder of graph
    templates (models/onnx_graph.py) for models beyond the shipped ones.
    """

    def __init__(
        self, live: LiveModel, fleet: str | None = None, verifier: Any = None, threads: int = 1,
        max_bytes: int | None = None, save_to: str | os.PathLike | None = None,
        guard_file: str | os.PathLike | None = None, templates: str | os.PathLike | None = None,
    ) -> None:
        self.live = live
        self.fleet = fleet
        if guard_file is not None and fleet is None:
            raise InferenceError("a replay-guard file needs the fleet id")
        self.guard = RunGuard(fleet or "", guard_file)
        self.verifier = verifier  # models.wire.keys.hub_verifier(...): only hub-signed models are served
        self.threads = threads
        self.max_bytes = max_bytes
        self.save_to = Path(save_to) if save_to else None
        self.templates = templates  # graph templates folder (default: the shipped ones)
        self.accepted = 0
        self.ignored = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.link = None
        self._lock = threading.Lock()  # one build at a time; paho delivers on one thread anyway

    def handle(self, payload: bytes) -> bool:
        """Process one model-topic payload; True if it was swapped in."""
        import onnx  # noqa: PLC0415 - only a device that follows the hub needs onnx (graph rebuild)

        from fedge.models import onnx_graph  # noqa: PLC0415 - onnx is only needed for envelopes

        if not payload:
            return False  # a cleared retained message
        with self._lock:
            try:
                proto, msg = onnx_graph.from_envelope(payload, verifier=self.verifier, max_bytes=self.max_bytes,
                                                      templates=self.templates)
                if self.fleet is not None and msg.fleet != self.fleet:
                    raise InferenceError(f"model of fleet {msg.fleet!r}, this device serves fleet {self.fleet!r}")
                position = Position.of(msg)
                reason = self.guard.check(position)
                if reason is not None:
                    raise StaleMessage(reason)
                if position == self.guard.newest and self.live.peek() is not None:
                    self.ignored += 1
                    return False
                if msg.version == UNTRAINED_VERSION:  # a new run's seeded initial model: nothing learnt yet
                    if position != self.guard.newest:
                        log.info("run %s started; keeps serving %s until its first trained version", msg.run,
                                 "the current model" if self.live.peek() is not None else "nothing")
                    self.guard.admit(position)  # the new run is the hub's now: the old one's models are replays
                    self.ignored += 1
                    return False
                current = self.live.peek()
                if current is not None and current.info.get("run") == msg.run and \
                        isinstance(current.info.get("version"), int) and msg.version <= current.info["version"]:
                    self.ignored += 1
                    return False
                predictor = Predictor.from_proto(proto, self.threads)
                self.guard.admit(position)
            except (EnvelopeError, onnx_graph.GraphError, InferenceError, onnx.checker.ValidationError) as exc:
                self.rejected += 1
                self.last_error = str(exc)
                log.warning("model message rejected, still serving the previous model: %s", exc)
                return False
            except Exception as exc:  # noqa: BLE001 - onnxruntime errors: never kill the network thread
                self.rejected += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("model message could not be loaded, still serving the previous model")
                return False
            if self.save_to is not None:
                self._save(proto)
            self.live.swap(predictor)
            self.accepted += 1
        log.info("serving %s run %s version %d", msg.spec, msg.run, msg.version)
        return True

    def _save(self, proto: onnx.ModelProto) -> None:
        try:
            self.save_to.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.save_to.with_suffix(self.save_to.suffix + ".tmp")
            tmp.write_bytes(proto.SerializeToString())
            os.replace(tmp, self.save_to)
        except OSError as exc:
            log.warning("could not save the model to %s: %s", self.save_to, exc)

    def on_message(self, topic: str, payload: bytes) -> None:
        """MqttLink handler."""
        self.handle(payload)

    def connect(self, broker: Any, prefix: str | None = None, client_id: str | None = None, timeout: float = 20.0):  # noqa: ANN201
        """Subscribe to the fleet's model topic; `broker` is a BrokerConfig or URL. Returns the link."""
        if self.fleet is None:
            raise InferenceError("following a hub needs the fleet id")
        config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(str(broker))
        topics = Topics(self.fleet, prefix or ROOT)
        # clean session: only the retained (latest) model matters, no queue of stale ones
        self.link = MqttLink(config, client_id or f"fedge-infer-{self.fleet}-{uuid.uuid4().hex[:8]}", clean_session=True)
        self.link.subscribe(topics.model, self.on_message)
        self.link.start(timeout)
        return self.link

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None

    def status(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "ignored": self.ignored, "rejected": self.rejected,
                "last_error": self.last_error, "connected": bool(self.link and self.link.connected),
                "newest": self.guard.status()["newest"]}


