"""The hub: select devices, publish model + task, collect answers until quorum or deadline,
aggregate (train rounds) or record the reports (e.g. evaluate rounds), evaluate, persist, repeat
through the run plan's stages until the last one ends. The settings (config.py), the plan
(plan.py), the task kinds (task_kinds.py), the round policies (rounds.py), the admission checks
(admission.py) and the device roster (roster.py) live beside it.

Update handling runs on paho's thread and never raises: every defect becomes a logged,
stored rejection. The round loop runs on the caller's thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedge.models.errors import ConfigError
from fedge.models.evaluate import evaluate
from fedge.models.registry import build_model, get_state, model_family, private_patterns, set_state, split_state
from fedge.models.wire import EnvelopeError, Topics, check_against, decode
from fedge.models.wire.codecs import UPDATE_CARRIES, keep_probs
from fedge.models.wire.envelope import Envelope, body_size
from fedge.models.wire.keys import device_key, hub_signer
from fedge.models.wire.messages import (
    ProbsFor,
    ReportMessage,
    TaskMessage,
    UpdateMessage,
    build_model_message,
    build_task_message,
    declined_in,
    parse_model,
    parse_report,
    parse_status,
    parse_update,
    status_payload,
)
from fedge.models.wire.transport import BrokerConfig, LinkFactory, make_link

from .admission import DUPLICATE, Reason, admission_reason
from .config import HubConfig
from .plan import Stage
from .roster import Roster
from .rounds import RoundsFailed, plan_position, round_train_settings, select_devices, stage_done
from .run_epoch import new_run_epoch
from .status import LiveState, status_dict
from .store import RunStore
from .strategies import weight_change
from .task_kinds import TASK_KINDS, weighted_mean

log = logging.getLogger("fedge.hub")


@dataclass
class Accepted:
    tensors: OrderedDict[str, np.ndarray]  # empty for a report
    num_samples: int
    metrics: dict
    nbytes: int  # the whole envelope
    body_bytes: int  # its body: what the uplink codec cost

    @classmethod
    def of(cls, msg: UpdateMessage | ReportMessage, payload: bytes) -> Accepted:
        tensors = msg.tensors if isinstance(msg, UpdateMessage) else OrderedDict()
        return cls(tensors, msg.num_samples, msg.metrics, len(payload), body_size(payload))


def _plus(tensors: OrderedDict[str, np.ndarray], error: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """An update's tensors with the downlink's rounding error added back (Hub._downlink_error)."""
    if not error:
        return tensors
    return OrderedDict((k, v + error[k] if k in error and error[k].shape == np.shape(v) else v)
                       for k, v in tensors.items())


def parse_answer(env: Envelope, probs_for: ProbsFor | None = None) -> UpdateMessage | ReportMessage:
    """A device's answer to a task: an update (tensors) or a report (numbers only). A context
    codec (maskrc) decodes with `probs_for(base_version)` (Hub.probs_for)."""
    if env.kind == "report":
        return parse_report(env)
    if env.kind != "update":
        raise EnvelopeError(f"a device answers with an update or a report, not a {env.kind!r} message")
    return parse_update(env, probs_for)


def _headline(scores: dict[str, float]) -> dict:
    """A round record's evaluation fields: `accuracy` and `loss` as every record has them (None
    where absent), and all of the model family's metrics under `metrics` (None: no evaluation)."""
    return {"accuracy": scores.get("accuracy"), "loss": scores.get("loss"), "metrics": scores or None}


RoundCallback = Callable[[dict], None]


def _some(names: list[str], shown: int = 10) -> str:
    """A log line's list of devices: the first `shown`, then how many more (a fleet of 1,000 that
    logged every id on each of its 1,000 joins wrote about 10 MB of log with -v)."""
    if not names:
        return "none yet"
    more = f", ... and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class Hub:
    def __init__(
        self,
        config: HubConfig,
        broker: BrokerConfig | LinkFactory,
        store: RunStore,
        test_x: np.ndarray | None = None,
        test_y: np.ndarray | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.store = store
        self.run_id = store.dir.name
        self.topics = Topics(config.fleet, config.prefix)
        self.strategy = config.make_strategy()
        self.on_round = on_round
        self.model = build_model(config.model, config.in_shape, config.num_classes, seed=config.seed)
        self.family = model_family(config.model)  # its metrics and headline: records, logs, the stop rule
        # only the shared tensors: the model's private ones (its per-device head) never reach the hub
        self.reference, private = split_state(config.model, get_state(self.model))
        self.private_names = frozenset(private)
        self.strategy.check_fits(config.model, self.reference)
        device = torch.device(config.eval_device)
        self.model.to(device)
        self.test_x = torch.from_numpy(test_x).to(device) if test_x is not None else None
        self.test_y = torch.from_numpy(test_y).to(device) if test_y is not None else None
        self.global_state = self.reference
        self.version = 0
        self.epoch = 0  # set by _restore_or_init: new run -> new_run_epoch, resumed run -> its own
        self._cond = threading.Condition()
        self._roster = Roster(config.max_samples)
        self._task: TaskMessage | None = None
        self._accepted: dict[str, Accepted] = {}
        self._declined: dict[str, tuple[str, str]] = {}  # device -> (refused|failed, reason), open attempt
        self._last_declined: dict[str, tuple[str, str]] = {}  # the same, of the attempt closed last
        self._closed_rounds: dict[int, set[str]] = {}  # round -> devices counted in it
        self.rejections = 0
        self.rejected_by: Counter[str] = Counter()  # rejection code -> count, since this hub started
        self.accepted_answers = 0  # updates and reports accepted into rounds, since this hub started
        self._phase = "starting"  # what the round loop is doing, for status(): one of status.PHASES
        self._current: tuple[bytes, bytes] | None = None  # open round's (model, task) payloads
        self._signer = hub_signer(config.keys_dir) if config.keys_dir else None
        self._stop = threading.Event()
        client_tag = hashlib.sha1(f"{config.prefix}/{config.fleet}".encode()).hexdigest()[:8]
        # a BrokerConfig connects over MQTT; a LinkFactory (e.g. InprocBroker.link) is another transport
        self.link = make_link(
            broker,
            client_id=f"fedge-hub-{config.fleet}-{client_tag}",
            will=(self.topics.hub_status, status_payload("offline", role="hub")),
            clean_session=False,  # updates published while the hub is down wait for it
        )
        self._restore_or_init()

    # -- persistence -----------------------------------------------------------------
    def _restore_or_init(self) -> None:
        stored = self.store.get_meta("config")
        epoch = self.store.get_meta("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):  # a new run, or one from before epochs
            epoch = new_run_epoch(self.config.keys_dir)
            self.store.set_meta("epoch", epoch)
        self.epoch = epoch
        if stored is None:
            self.store.set_meta("config", self.config.to_json())
            self.store.set_meta("status", "running")
            self.store.save_checkpoint(0, self.model_payload(0, self.global_state, codec="fp32"), keep=0)
            return
        history = self.store.rounds()
        last = history[-1]["model_version"] if history else 0  # rounds other than train keep the model
        msg = parse_model(decode(self.store.load_checkpoint(last)))
        self.global_state = msg.tensors
        self.version = last
        server_state = self.store.load_server_state(last)
        if server_state is None and last > 0 and self.strategy.stateful:
            raise ConfigError(f"run {self.run_id}: strategy {self.config.strategy} keeps server state, but none "
                              f"was saved with checkpoint {last}; it cannot resume exactly")
        self.strategy.load_server_state(server_state or {})
        self._closed_rounds = {r["round"]: set(r["participants"]) for r in self.store.rounds()}
        log.info("resuming run %s after round %d (model version %d)", self.run_id, self.store.last_round(), last)

    def model_payload(self, version: int, state: OrderedDict[str, np.ndarray], codec: str | None = None) -> bytes:
        """The model envelope: in the run's downlink codec for devices, or (codec="fp32") the
        exact global for checkpoints and the final model file, so a resumed run and the saved
        model never carry the downlink's rounding."""
        return build_model_message(
            self.config.fleet, self.run_id, version, self.config.model, state, codec=codec or self.config.model_codec,
            meta={"in_shape": list(self.config.in_shape), "num_classes": self.config.num_classes},
            signer=self._signer, epoch=self.epoch,
        )

    # -- MQTT inbound ----------------------------------------------------------------
    def _on_status(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        if device is None or not payload:
            return
        try:
            info = parse_status(payload)
        except EnvelopeError as exc:
            log.warning("ignored status of %s: %s", device, exc)
            return
        with self._cond:
            self._roster.update(device, info)
            self._note_declined(device, info)
            self._cond.notify_all()

    def _note_declined(self, device: str, info: dict) -> None:
        """A selected device that refused or failed this attempt of the open round (its status
        says so, edge_agent/agent.py): the round stops waiting for it. Called under the lock."""
        task = self._task
        if task is None or device not in task.selected or device in self._accepted or device in self._declined:
            return
        said = declined_in(info, task)
        if said is not None:
            self._declined[device] = said

    def _reject(self, device: str | None, round_id: int | None, reason: Reason) -> None:
        self.rejections += 1
        with self._cond:
            self.rejected_by[reason.code] += 1
        log.warning("rejected update from %s (round %s): %s", device or "?", round_id, reason)
        try:
            self.store.reject(device, round_id, reason)
        except Exception:  # noqa: BLE001 - bookkeeping must not break intake
            log.exception("could not record rejection")

    def _on_update(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        round_id: int | None = None
        try:
            key = None
            if self.config.keys_dir:
                key = device_key(self.config.keys_dir, device) if device else None
                if key is None:
                    self._reject(device, None, Reason("not_enrolled",
                                                      f"device {device!r} is not enrolled (no key in {self.config.keys_dir})"))
                    return
            env = decode(payload, max_bytes=self.config.max_payload, key=key)
            round_id = env.header.get("round") if isinstance(env.header.get("round"), int) else None
            upd = parse_answer(env, self.probs_for)
            if isinstance(upd, UpdateMessage):
                leaked = sorted(self.private_names.intersection(upd.tensors))
                if leaked:
                    raise EnvelopeError(f"update carries private tensor(s) {leaked[:3]} of {self.config.model}, "
                                        f"which stay on the device ({', '.join(private_patterns(self.config.model))})")
                check_against(upd.tensors, self.reference)  # malformed content is reported as such first
            reason = self._admit(device, upd)
            if reason == DUPLICATE:
                log.info("duplicate %s from %s for round %d ignored (already counted)", env.kind, device, upd.round)
                return
            if reason:
                self._reject(device, round_id, reason)
                return
        except EnvelopeError as exc:
            self._reject(device, round_id, Reason("bad_envelope", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - the hub never crashes on what a device sends
            self._reject(device, round_id, Reason("error", f"unexpected {type(exc).__name__}: {exc}"))
            return
        with self._cond:
            task = self._task
            if task is None or task.round != upd.round or upd.device in self._accepted:
                return  # round closed meanwhile, or a duplicate raced in
            if not self.store.add_pending(upd.round, upd.device, bytes(payload)):
                log.info("duplicate update from %s for round %d ignored", device, upd.round)
                return
            self._accepted[upd.device] = Accepted.of(upd, payload)
            self.accepted_answers += 1
            self._roster.seen(upd.device)
            self._cond.notify_all()
        log.debug("accepted %s from %s for round %d: %d samples, metrics %s, %d bytes", env.kind, upd.device,
                  upd.round, upd.num_samples, upd.metrics, len(payload))

    def _admit(self, device: str | None, upd: UpdateMessage | ReportMessage) -> Reason | None:
        with self._cond:
            return admission_reason(
                upd, device, fleet=self.config.fleet, run_id=self.run_id, strategy=self.config.strategy, task=self._task,
                closed_rounds=self._closed_rounds, accepted=self._accepted, roster=self._roster,
            )

    # -- the round loop --------------------------------------------------------------
    def stop(self) -> None:
        """Ask the round loop to stop after the current wait (SIGTERM handler)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def status(self) -> dict:
        """A JSON-ready snapshot of the run for the status page and /metrics (hub/status.py):
        the live state copied under the round lock, the history read from the run store."""
        with self._cond:
            live = LiveState(phase=self._phase, task=self._task, answered=sorted(self._accepted),
                             devices=self._roster.devices(), accepted_answers=self.accepted_answers,
                             rejected_by=dict(self.rejected_by), declined=dict(self._declined))
        return status_dict(self.config, self.run_id, live, self.store)

    def wait_for_round(self, round_id: int, timeout: float, min_updates: int = 0) -> TaskMessage:
        """Block until round `round_id` is open and holds at least `min_updates` accepted updates;
        return its task. Lets monitors (and tests) act on a live round without polling the hub's
        state. TimeoutError if that does not happen within `timeout` seconds."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                task = self._task
                if task is not None and task.round == round_id and len(self._accepted) >= min_updates:
                    return task
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"round {round_id} with {min_updates} update(s) not open within {timeout}s")
                self._cond.wait(remaining)

    def _wait_for_devices(self, needed: int) -> list[str]:
        """Block until `needed` devices are online; says who is online when it starts waiting,
        whenever that changes and every 30 s, so a hub waiting for devices is not silent."""
        end = time.time() + self.config.wait_devices_s
        said: tuple[list[str], float] | None = None
        with self._cond:
            while len(self._roster) < needed and not self._stop.is_set():
                self._phase = "waiting for devices"
                remaining = end - time.time()
                if remaining <= 0:
                    raise TimeoutError(
                        f"only {len(self._roster)} device(s) online after {self.config.wait_devices_s:.0f}s; "
                        f"need {needed} (--min-devices); start the agents with --fleet {self.config.fleet} and "
                        f"--topic-prefix {self.config.prefix} on this broker, or give --wait-devices more time"
                    )
                online = self._roster.online()
                if said is None or said[0] != online or time.time() - said[1] >= 30:
                    log.info("waiting for devices: %d of %d online (%s); giving up in %.0f s", len(online), needed,
                             _some(online), remaining)
                    said = (online, time.time())
                self._cond.wait(min(remaining, 1.0))
            return self._roster.online()

    def _select(self, online: list[str], round_id: int, attempt: int) -> list[str]:
        return select_devices(online, self.config.clients_per_round, self.config.seed, round_id, attempt)

    def _open(self, round_id: int, attempt: int, stage: Stage, round_in_stage: int) -> TaskMessage | None:
        """Open (or re-open, after a restart) the round's attempt; None if the hub was stopped
        while it waited for devices."""
        resumed = self.store.get_open_round()
        if resumed and resumed[0] == round_id and attempt == 0:
            task = TaskMessage(**resumed[1])
            task.epoch = self.epoch
            task.deadline = max(task.deadline, time.time() + self.config.resume_grace_s)
            log.info("round %d was open when the hub stopped; %d update(s) already stored", round_id,
                     len(self.store.pending(round_id)))
        else:
            online = self._wait_for_devices(max(self.config.min_devices, 1))
            if self._stop.is_set():
                log.info("shutting down while waiting for devices; round %d was not opened", round_id)
                return None
            trains = stage.kind == "train"
            # a train stage's params override the run's train settings (e.g. a lower lr in a second stage)
            settings = {**self.config.train, **stage.params}
            train = round_train_settings(settings, round_in_stage, stage.rounds) if trains else {}
            task = TaskMessage(
                fleet=self.config.fleet, run=self.run_id, round=round_id, model_version=self.version,
                selected=self._select(online, round_id, attempt), deadline=time.time() + self.config.deadline_s,
                train=self.strategy.configure_train(train) if trains else {}, state="open",
                codec=self.strategy.task_codec(self.config.update_codec) if trains else None, epoch=self.epoch,
                kind=stage.kind, params={} if trains else dict(stage.params),
            )
        self.store.open_round(round_id, asdict(task))
        with self._cond:
            self._task = task
            self._phase = "collecting"
            self._accepted = {}
            self._declined = {}
            for device, payload in self.store.pending(round_id).items():
                self._accepted[device] = Accepted.of(parse_answer(decode(payload), self.probs_for), payload)
            for device in task.selected:  # statuses that came before the task (a resumed round)
                status = self._roster.status(device)
                if status is not None:
                    self._note_declined(device, status)
            self._cond.notify_all()  # wake wait_for_round
        log.info("round %d (%s) open: %d device(s) selected (%s), deadline in %.0f s", round_id, task.kind,
                 len(task.selected), ", ".join(task.selected), task.deadline - time.time())
        return task

    def _collect(self, task: TaskMessage) -> dict[str, Accepted]:
        """Wait for the round's answers until the quorum, the deadline, or until every selected
        device has answered or said it will not (refused or failed); returns the accepted ones."""
        need = max(1, math.ceil(self.config.quorum * len(task.selected)))
        selected = set(task.selected)
        with self._cond:
            while len(self._accepted) < need and not self._stop.is_set():
                if selected <= set(self._accepted) | set(self._declined):
                    break  # nobody left to wait for
                remaining = task.deadline - time.time()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
            accepted = dict(self._accepted)
            declined = dict(self._declined)
            self._closed_rounds[task.round] = set(accepted)
            self._task = None
            self._last_declined = declined
            self._phase = "closing round"
        if self._stop.is_set():
            log.info("shutting down: round %d stays open with %d/%d answer(s); --resume continues it", task.round,
                     len(accepted), len(task.selected))
            return accepted
        if declined:
            log.warning("round %d: no answer from %s", task.round,
                        "; ".join(f"{d} ({kind}: {reason})" for d, (kind, reason) in sorted(declined.items())))
        late = sorted(selected - set(accepted) - set(declined))
        if late:
            log.info("round %d closed with %d/%d updates; ignored for this round: %s", task.round,
                     len(accepted), len(task.selected), ", ".join(late))
        return accepted

    def probs_for(self, version: int) -> OrderedDict[str, np.ndarray] | None:
        """The keep-probabilities (codecs.keep_probs) of model `version` for a context codec
        (maskrc): the current global's, the one every update of the open round trained from,
        as the devices decoded it (a lossy downlink rounds the scores, and the coder's model must
        be the device's to the bit); None for any other version (the update is then refused as a
        bad envelope)."""
        state, current = self.global_state, self.version  # one read: the round may advance meanwhile
        if version != current:
            return None
        cached = getattr(self, "_probs_cache", None)
        if cached is None or cached[0] != current or cached[1] is not state:
            cached = (current, state, keep_probs(self._as_devices_hold(current, state)))
            self._probs_cache = cached
        return cached[2]

    def metrics(self, state: OrderedDict[str, np.ndarray], full: bool = False) -> dict[str, float]:
        """The model family's test metrics of the global model (`family.metric_names`);
        empty without test data, or for a model with private tensors: the hub has the shared part
        only, no device's head, and a score with a head no device uses would not be the fleet's
        (docs/protocol.md 6.6)."""
        if self.test_x is None or self.private_names:
            return {}
        set_state(self.model, state)
        n = len(self.test_y) if (full or not self.config.eval_size) else min(self.config.eval_size, len(self.test_y))
        return evaluate(self.model, self.test_x[:n], self.test_y[:n], family=self.family)

    def run(self) -> list[dict]:
        """Run (or resume) rounds until a stop rule fires; returns the full round history."""
        self.link.subscribe(self.topics.all_device_status, self._on_status)
        self.link.subscribe(self.topics.all_device_updates, self._on_update)
        self.link.on_connect(self._on_connect)
        self.link.start()
        try:
            self._loop()
        finally:
            with self._cond:
                self._phase = "finished" if self.store.get_meta("status") == "finished" else "stopped"
            self.link.stop(final=(self.topics.hub_status, status_payload("offline", role="hub", run=self.run_id)))
        return self.store.rounds()

    def _on_connect(self) -> None:
        """After every (re)connect: announce, and re-publish the open round's model and task,
        since a broker that restarted without persistence has lost its retained messages."""
        self.link.publish(self.topics.hub_status, status_payload("online", role="hub", run=self.run_id), retain=True)
        current = self._current
        if current is not None:
            self.link.publish(self.topics.model, current[0], qos=1, retain=True)
            self.link.publish(self.topics.round, current[1], qos=1, retain=True)

    def _loop(self) -> None:
        stages = self.config.stages()
        stage, done = plan_position(self.config, stages, self.store.rounds())  # a resumed run: where it stood
        round_id = self.store.last_round() + 1
        attempt = 0
        while stage < len(stages) and not self._stop.is_set():
            started = time.time()
            task = self._open(round_id, attempt, stages[stage], done + 1)
            if task is None:
                return
            model_payload = self.model_payload(self.version, self.global_state)
            task_payload = build_task_message(task, self._signer)
            self._current = (model_payload, task_payload)
            self.link.publish(self.topics.model, model_payload, qos=1, retain=True)
            self.link.publish(self.topics.round, task_payload, qos=1, retain=True)
            accepted = self._collect(task)
            self._current = None
            if self._stop.is_set():
                return
            if len(accepted) < self.config.min_updates:
                self.store.discard_open_round(round_id)
                attempt += 1
                with self._cond:
                    self._closed_rounds.pop(round_id, None)
                if attempt > self.config.max_round_retries:
                    said = "; ".join(f"{d} {kind}: {reason}" for d, (kind, reason) in sorted(self._last_declined.items()))
                    raise RoundsFailed(f"round {round_id} failed {attempt} times: too few devices answered in time "
                                       f"(min_updates={self.config.min_updates})" + (f"; {said}" if said else ""))
                log.warning("round %d got %d update(s) < min_updates=%d; re-running it (attempt %d)",
                            round_id, len(accepted), self.config.min_updates, attempt + 1)
                continue
            record = self._complete(task, accepted, started, len(model_payload) + len(task_payload), stage)
            attempt = 0
            done += 1
            if self.on_round:
                self.on_round(record)
            if stage_done(self.config, stages[stage], record, done):
                stage, done = stage + 1, 0
                if stage < len(stages):
                    log.info("stage %d of %d: %d round(s) of %s", stage + 1, len(stages), stages[stage].rounds,
                             stages[stage].kind)
            round_id += 1
        if not self._stop.is_set():
            self._finish()

    def _complete(self, task: TaskMessage, accepted: dict[str, Accepted], started: float, down_bytes: int,
                  stage: int) -> dict:
        """Close a round: a train round aggregates a new global model; a round of a report kind
        keeps the model and records what the reports say (task_kinds.TASK_KINDS)."""
        summarize = TASK_KINDS[task.kind].summarize
        new_state = None
        if summarize is None:
            new_state, fields = self._aggregate(accepted)
        else:
            scores = self.metrics(self.global_state)  # the same model as the round before: continuous curves
            fields = {"model_version": self.version, **_headline(scores), "weight_change": None,
                      "train_loss": None, **summarize({d: (a.num_samples, a.metrics) for d, a in accepted.items()})}
        record = {
            "round": task.round,
            **fields,
            "participants": sorted(accepted),
            "selected": list(task.selected),
            "bytes_up": int(sum(a.nbytes for a in accepted.values())),
            "bytes_up_body": int(sum(a.body_bytes for a in accepted.values())),
            "bytes_down": int(down_bytes * len(task.selected)),
            "seconds": time.time() - started,
            "kind": task.kind,
            "stage": stage,
        }
        self.store.complete_round(record)
        if new_state is not None:
            self.global_state, self.version = new_state, record["model_version"]
            score = (record["metrics"] or {}).get(self.family.headline)
            log.info("round %d: %d updates, %s %s, change %.4f", task.round, len(accepted), self.family.headline,
                     f"{score:.4f}" if score is not None else "n/a", record["weight_change"])
        else:
            score = weighted_mean({d: (a.num_samples, a.metrics) for d, a in accepted.items()}, self.family.headline)
            log.info("round %d (%s): %d reports, device %s %s", task.round, task.kind, len(accepted), self.family.headline,
                     f"{score:.4f}" if score is not None else "n/a")
        return record

    def _aggregate(self, accepted: dict[str, Accepted]) -> tuple[OrderedDict[str, np.ndarray], dict]:
        """A train round's new global model, checkpointed with the strategy's server state, and
        its record fields."""
        # sorted by device id: the float sums do not depend on arrival order (reproducible runs)
        error = self._downlink_error()
        updates = [(_plus(a.tensors, error), a.num_samples) for _, a in sorted(accepted.items())]
        new_state = self.strategy.aggregate(self.global_state, updates)
        change = weight_change(self.global_state, new_state)
        scores = self.metrics(new_state)
        new_version = self.version + 1
        self.store.save_checkpoint(new_version, self.model_payload(new_version, new_state, codec="fp32"),
                                   keep=self.config.keep_checkpoints, server_state=self.strategy.server_state())
        train_losses = [a.metrics.get("loss") for a in accepted.values() if isinstance(a.metrics.get("loss"), (int, float))]
        return new_state, {"model_version": new_version, **_headline(scores), "weight_change": change,
                           "train_loss": float(np.mean(train_losses)) if train_losses else None}

    def _downlink_error(self) -> dict[str, np.ndarray]:
        """What the lossy downlink took from this round's model (exact global minus what the
        devices decoded), per shared tensor: empty for an fp32 downlink, or when updates are
        masks or changes rather than trained states (UPDATE_CARRIES). A device trains from the
        rounded model, so its trained state is `rounded + change`; adding this error back gives
        `global + change`, and the hub's fp32 model moves by the devices' changes only instead
        of being snapped to the downlink's grid every round (docs/protocol.md, "Model downlink")."""
        codec = self.strategy.task_codec(self.config.update_codec)
        if self.config.model_codec == "fp32" or UPDATE_CARRIES.get(codec or "", "state") != "state":
            return {}
        received = self._as_devices_hold(self.version, self.global_state)
        return {k: (np.asarray(self.global_state[k], dtype=np.float32) - v) for k, v in received.items()}

    def _as_devices_hold(self, version: int, state: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """The shared tensors of `state` as a device decodes them from the downlink: `state`
        itself for fp32, else the decoded model envelope (its rounding included)."""
        if self.config.model_codec == "fp32":
            return state
        return parse_model(decode(self.model_payload(version, state))).tensors

    def _finish(self) -> None:
        """Publish the final model and a 'finished' task so agents know the run is over."""
        final_model = self.model_payload(self.version, self.global_state)
        done = TaskMessage(fleet=self.config.fleet, run=self.run_id, round=self.version, model_version=self.version,
                           selected=[], deadline=time.time(), train={}, state="finished",
                           epoch=self.epoch)
        self._current = (final_model, build_task_message(done, self._signer))
        self.link.publish(self.topics.model, final_model, qos=1, retain=True)
        info = self.link.publish(self.topics.round, self._current[1], qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            pass
        self.store.set_meta("status", "finished")
