"""The four envelope kinds (model, task, update, report) and the JSON status message.

Builders and parsers live together so the header fields are defined once; every parser
raises EnvelopeError naming the bad field.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..spec import ModelSpec, OptionValue
from .codecs import CONTEXT_CODECS, decode_tensors, encode_tensors
from .envelope import Envelope, EnvelopeError, Signer, encode


def _field(header: Mapping[str, Any], name: str, types: type | tuple[type, ...]) -> Any:
    if name not in header:
        raise EnvelopeError(f"header misses field {name!r}")
    value = header[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise EnvelopeError(f"header field {name!r} has type bool")
    if not isinstance(value, types):
        raise EnvelopeError(f"header field {name!r} has type {type(value).__name__}")
    return value


def _num_samples(header: Mapping[str, Any]) -> int:
    """An update's or report's example count: its weight in the fleet's means, so at least 1."""
    num_samples = _field(header, "num_samples", int)
    if num_samples < 1:
        raise EnvelopeError(f"num_samples must be positive, got {num_samples}")
    return int(num_samples)


def _epoch(header: Mapping[str, Any]) -> int:
    """The run epoch of a model or task; absent (a hub from before epochs) reads as 0."""
    if "epoch" not in header:
        return 0
    epoch = _field(header, "epoch", int)
    if epoch < 0:
        raise EnvelopeError(f"header field 'epoch' must be >= 0, got {epoch}")
    return int(epoch)


# ----------------------------------------------------------------------------- model
@dataclass
class ModelMessage:
    fleet: str
    run: str
    version: int
    model: str  # the registered name
    tensors: OrderedDict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # the run's epoch (models/wire/freshness.py); 0 = a hub from before epochs
    model_options: dict[str, OptionValue] = field(default_factory=dict)  # non-default options; {}: the defaults

    @property
    def spec(self) -> ModelSpec:
        """The model as the hub specified it; the receiver checks it (registry.model_spec) before use."""
        return ModelSpec(self.model, self.model_options)


def build_model_message(
    fleet: str, run: str, version: int, model: ModelSpec | str, tensors: Mapping[str, np.ndarray], codec: str = "fp32",
    meta: Mapping[str, Any] | None = None, signer: Signer | None = None, epoch: int = 0,
) -> bytes:
    """The model envelope. `model` is a ModelSpec (a plain name means its defaults): the header
    carries its name in "model" and its options, when it has any, in "model_options"."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    fields_, body = encode_tensors(tensors, codec)
    header = {"kind": "model", "fleet": fleet, "run": run, "epoch": int(epoch), "version": int(version),
              "model": spec.name, "meta": dict(meta or {}), "created": time.time(), **fields_}
    if spec.options:
        header["model_options"] = spec.options_dict()
    return encode(header, body, signer=signer)


def _model_options(header: Mapping[str, Any]) -> dict[str, OptionValue]:
    """The header's "model_options": an object of numbers and strings; absent (every hub before
    specs, or a model at its defaults) is {}."""
    options = header.get("model_options", {})
    if not isinstance(options, dict):
        raise EnvelopeError("header field 'model_options' must be an object")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise EnvelopeError(f"model option {key!r} must be a number or a string, got {type(value).__name__}")
    return dict(options)


def parse_model(env: Envelope) -> ModelMessage:
    h = env.header
    if env.kind != "model":
        raise EnvelopeError(f"expected a model message, got kind {env.kind!r}")
    meta = h.get("meta") or {}
    if not isinstance(meta, dict):
        raise EnvelopeError("header field 'meta' must be an object")
    return ModelMessage(
        fleet=_field(h, "fleet", str), run=_field(h, "run", str), version=_field(h, "version", int),
        model=_field(h, "model", str), tensors=decode_tensors(h, env.body), meta=dict(meta), epoch=_epoch(h),
        model_options=_model_options(h),
    )


# ----------------------------------------------------------------------------- task
DEFAULT_TASK_KIND = "train"  # a task without `task_kind` (every hub before task kinds) means train


@dataclass
class TaskMessage:
    fleet: str
    run: str
    round: int
    model_version: int
    selected: list[str]
    deadline: float
    train: dict[str, Any]
    state: str  # "open" (train now) or "finished" (the run is over)
    codec: str | None = None  # update codec the hub asks for; None = the device's profile decides
    epoch: int = 0  # the run's epoch (models/wire/freshness.py); 0 = a hub from before epochs
    kind: str = DEFAULT_TASK_KIND  # what the device does with the model (TASK_KINDS)
    params: dict[str, Any] = field(default_factory=dict)  # the kind's parameters (train's are in `train`)



def build_task_message(task: TaskMessage, signer: Signer | None = None) -> bytes:
    header = {"kind": "task", "fleet": task.fleet, "run": task.run, "round": task.round,
              "model_version": task.model_version, "selected": list(task.selected), "deadline": task.deadline,
              "train": dict(task.train), "state": task.state, "update_codec": task.codec,
              "epoch": int(task.epoch), "task_kind": task.kind, "params": dict(task.params)}
    return encode(header, b"", signer=signer)


def parse_task(env: Envelope) -> TaskMessage:
    h = env.header
    if env.kind != "task":
        raise EnvelopeError(f"expected a task message, got kind {env.kind!r}")
    selected = _field(h, "selected", list)
    if not all(isinstance(s, str) for s in selected):
        raise EnvelopeError("header field 'selected' must list device ids")
    state = _field(h, "state", str)
    if state not in ("open", "finished"):
        raise EnvelopeError(f"task state {state!r} is neither 'open' nor 'finished'")
    kind = _field(h, "task_kind", str) if "task_kind" in h else DEFAULT_TASK_KIND
    params = _field(h, "params", dict) if "params" in h else {}
    return TaskMessage(
        fleet=_field(h, "fleet", str), run=_field(h, "run", str), round=_field(h, "round", int),
        model_version=_field(h, "model_version", int), selected=selected,
        deadline=float(_field(h, "deadline", (int, float))), train=_field(h, "train", dict), state=state,
        codec=h.get("update_codec") if isinstance(h.get("update_codec"), str) else None, epoch=_epoch(h),
        kind=kind, params=params,
    )


# ----------------------------------------------------------------------------- update
@dataclass
class UpdateMessage:
    fleet: str
    run: str
    device: str
    round: int
    base_version: int
    num_samples: int
    tensors: OrderedDict[str, np.ndarray]
    metrics: dict[str, Any]
    codec: str = "fp32"


def build_update_message(
    fleet: str, run: str, device: str, round_id: int, base_version: int, tensors: Mapping[str, np.ndarray],
    num_samples: int, metrics: Mapping[str, float] | None = None, codec: str = "fp32", key: bytes | None = None,
    model_probs: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """An update envelope; `model_probs` is the probability model of a context codec (maskrc:
    codecs.keep_probs of the received global scores)."""
    fields_, body = encode_tensors(tensors, codec, model_probs=model_probs)
    header = {"kind": "update", "fleet": fleet, "run": run, "device": device, "round": int(round_id),
              "base_version": int(base_version), "num_samples": int(num_samples),
              "metrics": dict(metrics or {}), **fields_}
    return encode(header, body, key=key)


def parse_update(env: Envelope, probs_for: ProbsFor | None = None) -> UpdateMessage:
    """An update's fields and tensors. A context codec (maskrc) decodes with
    `probs_for(base_version)`, the keep-probabilities of the model the device trained from
    (None: the receiver does not hold that version, and decoding fails with EnvelopeError)."""
    h = env.header
    if env.kind != "update":
        raise EnvelopeError(f"expected an update message, got kind {env.kind!r}")
    num_samples = _num_samples(h)
    metrics = h.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise EnvelopeError("header field 'metrics' must be an object")
    return UpdateMessage(
        fleet=_field(h, "fleet", str), run=_field(h, "run", str), device=_field(h, "device", str),
        round=_field(h, "round", int), base_version=_field(h, "base_version", int), num_samples=num_samples,
        tensors=decode_tensors(h, env.body, model_probs=_probs(h, probs_for)), metrics=metrics,
        codec=str(h.get("codec")),
    )


ProbsFor = Callable[[int], "Mapping[str, np.ndarray] | None"]  # model version -> keep-probabilities (or None)


def _probs(h: Mapping[str, Any], probs_for: ProbsFor | None) -> Mapping[str, np.ndarray] | None:
    codec = h.get("codec")
    if not isinstance(codec, str) or codec not in CONTEXT_CODECS:
        return None  # a malformed codec is refused by decode_tensors, which names it
    version = _field(h, "base_version", int)
    probs = probs_for(version) if probs_for is not None else None
    if probs is None:
        raise EnvelopeError(f"codec {h.get('codec')} decodes with the keep-probabilities of model version {version}, "
                            "which the receiver does not hold")
    return probs


# ----------------------------------------------------------------------------- report
@dataclass
class ReportMessage:
    """A device's answer to a task that produces numbers, not tensors (e.g. `evaluate`)."""

    fleet: str
    run: str
    device: str
    round: int
    base_version: int  # the model version the task used
    task_kind: str  # the kind of task this answers
    num_samples: int  # examples the metrics were measured on (their weight in the fleet's mean)
    metrics: dict[str, Any]


def build_report_message(
    fleet: str, run: str, device: str, round_id: int, base_version: int, task_kind: str, num_samples: int,
    metrics: Mapping[str, Any], key: bytes | None = None,
) -> bytes:
    header = {"kind": "report", "fleet": fleet, "run": run, "device": device, "round": int(round_id),
              "base_version": int(base_version), "task_kind": task_kind, "num_samples": int(num_samples),
              "metrics": dict(metrics)}
    return encode(header, b"", key=key)


def parse_report(env: Envelope) -> ReportMessage:
    h = env.header
    if env.kind != "report":
        raise EnvelopeError(f"expected a report message, got kind {env.kind!r}")
    if env.body or "tensors" in h:
        raise EnvelopeError(f"a report carries no tensors, but this one has a {len(env.body)}-byte body"
                            f"{' and a tensor manifest' if 'tensors' in h else ''}")
    num_samples = _num_samples(h)
    metrics = _field(h, "metrics", dict)
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EnvelopeError(f"report metric {name!r} must be a finite number, got {value!r}")
    return ReportMessage(
        fleet=_field(h, "fleet", str), run=_field(h, "run", str), device=_field(h, "device", str),
        round=_field(h, "round", int), base_version=_field(h, "base_version", int),
        task_kind=_field(h, "task_kind", str), num_samples=num_samples, metrics=dict(metrics),
    )


# ----------------------------------------------------------------------------- status
def status_payload(state: str, **info: Any) -> bytes:
    """Device/hub presence: small UTF-8 JSON so `mosquitto_sub` shows it readably."""
    return json.dumps({"state": state, "ts": time.time(), **info}, separators=(",", ":")).encode()


def parse_status(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"status is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("state") not in ("online", "offline"):
        raise EnvelopeError("status must be a JSON object with state 'online' or 'offline'")
    return data


# The status fields in which a device says it will not answer a round: `refused` (a check said no
# before the work started) and `failed` (the work itself raised). Both carry the same record.
DECLINED_KINDS = ("refused", "failed")
DECLINED_FIELDS = ("run", "round", "deadline", "reason", "ts")


def declined_record(task: TaskMessage, reason: str) -> dict[str, Any]:
    """The status record of a round this device will not answer. The task's `deadline` names the
    attempt: a round the hub re-runs gets a new deadline, so an old record never ends a new attempt."""
    return {"run": task.run, "round": int(task.round), "deadline": float(task.deadline), "reason": reason,
            "ts": time.time()}


def declined_in(status: Mapping[str, Any], task: TaskMessage) -> tuple[str, str] | None:
    """(kind, reason) if this status says its device refused or failed exactly this attempt of the
    task's round (same run, round and deadline), else None; malformed records are not believed."""
    for kind in DECLINED_KINDS:
        record = status.get(kind)
        if not isinstance(record, dict):
            continue
        deadline = record.get("deadline")
        if (record.get("run") == task.run and record.get("round") == task.round
                and isinstance(deadline, (int, float)) and not isinstance(deadline, bool)
                and float(deadline) == float(task.deadline)):
            return kind, str(record.get("reason", ""))
    return None
