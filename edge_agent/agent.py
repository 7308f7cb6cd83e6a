"""The device agent: announce, wait for round tasks, run each (train locally, or another task kind
of edge_agent/tasks.py), publish one answer (an update or a report) per round.

All network handling is on the link's thread; training runs on a pool worker (a thread of the
agent's own TrainingPool, or a simulator's worker process) so the MQTT keepalive never stalls
behind a long epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.models.data import Split
from fedge.models.errors import ConfigError
from fedge.models.partition import label_counts
from fedge.models.registry import model_spec, parameter_count
from fedge.models.spec import ModelSpec
from fedge.models.wire import EnvelopeError, Topics, decode
from fedge.models.wire.envelope import DEFAULT_MAX_BYTES, Verifier
from fedge.models.wire.freshness import Position, RunGuard, StaleMessage
from fedge.models.wire.messages import (
    ModelMessage,
    TaskMessage,
    declined_record,
    parse_model,
    parse_status,
    parse_task,
    status_payload,
)
from fedge.models.wire.transport import BrokerConfig, LinkFactory, make_link

from .pool import Pool
from .private_store import PrivateStore
from .profile import Profile, ProfileError
from .shared_data import DeviceData, LocalData
from .task_checks import Refused, check_input
from .tasks import HANDLERS, Job
from .trainer import estimate_training_mb, initial_private

log = logging.getLogger("fedge.agent")
_UNVERIFIED_WARNED: set[str] = set()  # fleets (topic base) already warned about in this process


class Agent:
    """One device: its profile, its local data and its own MQTT connection."""

    def __init__(
        self,
        device_id: str,
        profile: Profile,
        broker: BrokerConfig | LinkFactory,
        topics: Topics,
        data: Split,
        num_classes: int,
        pool: Pool,
        seed: int = 0,
        max_payload: int = DEFAULT_MAX_BYTES,
        tamper: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
        hub_verifier: Verifier | None = None,
        device_key: bytes | None = None,
        guard: RunGuard | None = None,
        warn_unverified: bool = True,
        private_state: str | Path | None = None,
        residual_state: str | Path | None = None,
        data_ref: DeviceData | None = None,
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.topics = topics
        self.num_classes = num_classes
        self.in_shape = tuple(int(d) for d in data.x.shape[1:])
        self.x = torch.from_numpy(np.ascontiguousarray(data.x))
        self.y = torch.from_numpy(np.ascontiguousarray(data.y))
        # how a training worker reaches the data: these tensors, or (simulator) the same data in shared memory
        self.data: DeviceData = data_ref or LocalData(self.x, self.y)
        self.class_counts = label_counts(data.y, num_classes)
        self.pool = pool
        self.seed = seed
        self.max_payload = max_payload
        self.tamper = tamper  # simulation of a lying device (hub.attacks); None on real devices
        self.publish_delay_s = 0.0  # simulation of a slow device; 0 on real devices
        self.hub_verifier = hub_verifier  # set: models and tasks must carry the hub's signature
        self.device_key = device_key  # set: updates carry an HMAC tag the hub checks
        self.warn_unverified = warn_unverified  # False: a simulator on its own in-process broker
        self.guard = guard or RunGuard(topics.fleet)  # refuses replays of earlier runs/versions
        self.private = PrivateStore(private_state)  # the model's private tensors (its head): never sent
        # error feedback (sign uplinks): what quantisation dropped, added to the next change; never sent
        self.residual = PrivateStore(residual_state)
        self._lock = threading.Lock()
        self._model: ModelMessage | None = None
        self._task: TaskMessage | None = None
        self._busy: set[tuple[str, int]] = set()
        self._done: set[tuple[str, int]] = set()  # (run, round) answered
        # (run, round, deadline) refused or failed: a re-run of the round (new deadline) is tried again
        self._declined: set[tuple[str, int, float]] = set()
        self._dead = False
        self._fits: set[ModelSpec] = set()
        self._last_update: tuple[tuple[str, int], bytes] | None = None
        self._hub_status_seen: bytes | None = None  # the last hub status acted on (a re-delivery is skipped)
        self._refused: dict[str, Any] | None = None  # the latest round refused, reported in the status
        self._failed: dict[str, Any] | None = None  # the latest round whose job raised, reported in the status
        self.seconds_per_sample: float | None = None  # measured: one sample, one epoch (time budget)
        self.finished = threading.Event()
        self.training = threading.Event()  # set from job submit until the answer is sent (monitors, tests)
        self.rounds_trained = 0
        self.reports_sent = 0  # answers to task kinds other than train (e.g. evaluate)
        self.bytes_up = 0
        self.bytes_down = 0
        # a BrokerConfig connects over MQTT; a LinkFactory (e.g. InprocBroker.link) is another transport
        self.link = make_link(
            broker,
            client_id=f"fedge-dev-{topics.fleet}-{device_id}",
            will=(topics.device_status(device_id), status_payload("offline", device=device_id)),
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> Agent:
        self._check_memory_budget()
        self._warn_if_unverified()
        # The model topic is subscribed only while this device is selected and lacks the
        # round's model: unselected devices never download it (fewer bytes on the air).
        self.link.subscribe(self.topics.round, self._on_task)
        self.link.subscribe(self.topics.hub_status, self._on_hub_status)
        self.link.on_connect(self._announce)
        self.link.start(timeout)
        return self

    def stop(self) -> None:
        """Clean shutdown: retained 'offline' status, then disconnect."""
        self._dead = True
        self.link.stop(final=(self.topics.device_status(self.device_id), status_payload("offline", device=self.device_id)))

    def crash(self) -> None:
        """Simulate a device dying: no goodbye, results in flight are dropped, the will fires."""
        self._dead = True
        self.link.kill()

    def _check_memory_budget(self, spec: ModelSpec | None = None) -> None:
        """Refuse a model whose training would not fit the profile's memory budget."""
        spec = spec or self.profile.model
        if spec in self._fits:
            return
        params = parameter_count(spec, self.in_shape, self.num_classes)
        need = estimate_training_mb(params, self.profile.batch_size, int(np.prod(self.in_shape)), self.profile.optimizer)
        if need > self.profile.memory_budget_mb:
            raise ProfileError(
                f"profile {self.profile.name!r}: training {spec} needs about {need:.0f} MiB, "
                f"above memory_budget_mb={self.profile.memory_budget_mb}; lower batch_size or raise the budget"
            )
        self._fits.add(spec)

    def _warn_if_unverified(self) -> None:
        """Without the hub's public key, anyone who may write the model/round topics can make this
        device train anything: say so once per fleet and process (the simulator runs many)."""
        if self.hub_verifier is not None or not self.warn_unverified or self.topics.base in _UNVERIFIED_WARNED:
            return
        _UNVERIFIED_WARNED.add(self.topics.base)
        log.warning("%s: no hub public key (--hub-public-key): this agent trains any model and task that anyone "
                    "with write access to %s/model and /round publishes", self.device_id, self.topics.base)

    def _announce(self) -> None:
        info: dict[str, Any] = {
            "device": self.device_id,
            "num_samples": int(len(self.y)),
            "class_counts": self.class_counts,
            "profile": self.profile.summary(),
            "task_kinds": sorted(HANDLERS),
        }
        if self._refused is not None:
            info["refused"] = self._refused
        if self._failed is not None:
            info["failed"] = self._failed
        if self.guard.last_refusal:
            info["replays_refused"] = {"count": self.guard.refused, "last": self.guard.last_refusal}
        self.link.publish(self.topics.device_status(self.device_id), status_payload("online", **info), retain=True)

    # -- inbound ---------------------------------------------------------------------
    def _on_hub_status(self, topic: str, payload: bytes) -> None:
        """Announce again when the hub says it is online (it does after every (re)connect, once
        subscribed). A broker that sends no retained messages to a wildcard subscription (RabbitMQ's
        MQTT plugin: the hub reads `dev/+/status`) never hands a hub that starts after this device
        the status retained before it; without this, such a hub waits for devices that are there."""
        if not payload or self._dead or payload == self._hub_status_seen:  # a re-delivered copy
            return
        self._hub_status_seen = payload
        try:
            online = parse_status(payload)["state"] == "online"
        except EnvelopeError as exc:
            log.warning("%s: ignored hub status: %s", self.device_id, exc)
            return
        if online:
            self._announce()

    def _receive(self, payload: bytes, what: str, parse: Callable[[Any], Any]) -> Any | None:
        """Decode, verify and parse a hub message; None (with the reason logged) if it is bad
        or belongs to another fleet. An empty payload (a cleared retained topic) is ignored."""
        if not payload:
            return None
        self.bytes_down += len(payload)
        try:
            msg = parse(decode(payload, max_bytes=self.max_payload, verifier=self.hub_verifier))
        except EnvelopeError as exc:
            log.warning("%s: dropped %s message: %s", self.device_id, what, exc)
            return None
        if msg.fleet != self.topics.fleet:
            log.warning("%s: dropped %s of fleet %r", self.device_id, what, msg.fleet)
            return None
        try:
            self.guard.admit(Position.of(msg))
        except StaleMessage as exc:
            log.warning("%s: refused %s: %s", self.device_id, what, exc)
            if self.guard.refused == 1 or self.guard.refused % 100 == 0:
                self._announce()  # the reason shows in this device's retained status
            return None
        return msg

    def _on_model(self, topic: str, payload: bytes) -> None:
        msg = self._receive(payload, "model", parse_model)
        if msg is None:
            return
        with self._lock:
            self._model = msg
            task = self._task
            wanted = task is not None and task.state == "open" and msg.run == task.run and msg.version == task.model_version
        if wanted:
            self.link.unsubscribe(self.topics.model)
        self._maybe_run()

    def _on_task(self, topic: str, payload: bytes) -> None:
        task = self._receive(payload, "task", parse_task)
        if task is None:
            return
        with self._lock:
            self._task = task
            if self._last_update is not None and self._last_update[0] != (task.run, task.round):
                self._last_update = None  # its round is over: no re-send will be needed (memory: 1,000 devices)
        if task.state == "finished":
            self.finished.set()
            return
        self.finished.clear()
        self._resend_if_still_open(task)
        self._maybe_run()

    def _resend_if_still_open(self, task: TaskMessage) -> None:
        """The task is re-delivered after a reconnect (or re-published by a restarted hub):
        if it is the round we already answered, send the same update again. A broker that
        restarted without persistence may have dropped it; the hub ignores duplicates."""
        with self._lock:
            last = self._last_update
        if last is not None and last[0] == (task.run, task.round) and not self._dead and time.time() <= task.deadline:
            log.info("%s: round %d still open after reconnect; re-sending its update", self.device_id, task.round)
            self.link.publish(self.topics.device_update(self.device_id), last[1], qos=1)

    # -- running tasks ---------------------------------------------------------------
    def _maybe_run(self) -> None:
        """Run the open task if this device is selected for it and has its model: the task's
        kind picks the handler (tasks.HANDLERS); a kind this device does not run is refused."""
        with self._lock:
            task, model = self._task, self._model
            if self._dead or task is None or task.state != "open" or self.device_id not in task.selected:
                return
            key = (task.run, task.round)
            if key in self._done or key in self._busy or (task.run, task.round, task.deadline) in self._declined:
                return
            handler = HANDLERS.get(task.kind)
            if handler is None:  # refused before the model is fetched: no download for it
                self._declined.add((task.run, task.round, task.deadline))
            else:
                if time.time() > task.deadline:
                    log.info("%s: round %d already past its deadline, skipping", self.device_id, task.round)
                    return
                # without the round's model, its handler calls us again when it arrives
                need_model = model is None or model.run != task.run or model.version != task.model_version
                if not need_model:
                    self._busy.add(key)
        if handler is None:
            self._decline(task, "refused", f"task kind {task.kind!r} is not one this device runs "
                                           f"(it runs: {', '.join(HANDLERS)})")
            return
        if need_model:
            self.link.subscribe(self.topics.model, self._on_model)
            return
        try:
            spec = model_spec(model.spec)  # an unknown model, option or value from the hub is refused here
            check_input(model.meta, self.in_shape, self.num_classes)
            self._check_memory_budget(spec)
            model = dataclasses.replace(model, model=spec.name, model_options=spec.options_dict())
            job = handler(self, task, model)
        except ConfigError as exc:  # ProfileError (memory budget) and Refused (task checks)
            with self._lock:
                self._busy.discard(key)
            self._decline(task, "refused", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - preparing the job failed (e.g. a corrupt private-state file)
            with self._lock:
                self._busy.discard(key)
            self._decline(task, "failed", f"{type(exc).__name__}: {exc}")
            return

        def done(result: Any) -> None:
            if self.publish_delay_s > 0:
                threading.Timer(self.publish_delay_s, self._finish, (task, result, job)).start()
            else:
                self._finish(task, result, job)

        self.training.set()
        log.debug("%s: round %d: running the %s task", self.device_id, task.round, task.kind)
        self.pool.submit((spec, self.in_shape, self.num_classes), job.request, done)

    def private_tensors(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        """This device's own private tensors (its head): those kept from earlier rounds or an
        earlier start, else (first round, or kept ones that no longer fit) the seeded model's."""
        kept = self.private.load(spec)
        fresh = initial_private(spec, self.in_shape, self.num_classes, self.seed)
        if kept is None:
            return fresh
        if {k: v.shape for k, v in kept.items()} != {k: v.shape for k, v in fresh.items()}:
            log.warning("%s: kept private tensors of %s do not fit this model (other classes or input?); "
                        "starting them afresh", self.device_id, spec)
            return fresh
        return kept

    def _finish(self, task: TaskMessage, result: Any, job: Job) -> None:
        key = (task.run, task.round)
        with self._lock:
            self._busy.discard(key)
            if not self._busy:
                self.training.clear()
        if not isinstance(result, Exception):
            job.settle(result)  # what the device keeps (private tensors, timing), sent or not
        if self._dead:
            return
        if isinstance(result, Refused):
            self._decline(task, "refused", str(result))
            return
        if isinstance(result, Exception):
            self._decline(task, "failed", f"{type(result).__name__}: {result}")
            return
        payload = job.message(result)
        self.link.publish(self.topics.device_update(self.device_id), payload, qos=1)
        self.bytes_up += len(payload)
        with self._lock:
            self._done.add(key)
            self._last_update = (key, payload)
            if task.kind == "train":
                self.rounds_trained += 1
            else:
                self.reports_sent += 1
        log.info("%s: round %d: %s, sent %d bytes", self.device_id, task.round, job.describe(result), len(payload))

    def _decline(self, task: TaskMessage, kind: str, reason: str) -> None:
        """Log why this attempt of the round gets no answer and say it in the (retained) status,
        as `refused` (a check said no) or `failed` (the job raised): the hub logs it and stops
        waiting for this device, which would otherwise look like a slow one until the deadline."""
        with self._lock:
            self._declined.add((task.run, task.round, task.deadline))
        record = declined_record(task, reason)
        if kind == "refused":
            what = "train" if task.kind == "train" else f"run the {task.kind} task of"
            log.error("%s: cannot %s round %d: %s", self.device_id, what, task.round, reason)
            self._refused = record
        else:
            log.error("%s: %s task of round %d failed: %s", self.device_id, task.kind, task.round, reason)
            self._failed = record
        if not self._dead:
            self._announce()
