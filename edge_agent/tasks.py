"""The task kinds a device runs: one handler per kind, all in one registry (HANDLERS).

A handler gets the round's task and the model it names (already checked by the agent:
`model.spec` is a valid ModelSpec and `check_input` found the model built for this device's
input shape and class count), checks them (raising Refused, which
the agent reports in its status), and returns a Job: the work as a request (plain data, edge_agent/work.py) that any
training pool runs, and how its result becomes the envelope sent back (an
`update` with tensors, or a `report` with numbers only). A task kind not in HANDLERS is
refused with the list of the kinds this device runs (docs/protocol.md 4.2.2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedge.models.registry import private_patterns
from fedge.models.wire.codecs import CONTEXT_CODECS, keep_probs
from fedge.models.wire.messages import ModelMessage, TaskMessage, build_report_message, build_update_message

from .task_checks import check_evaluate_params, check_model, check_train_settings, time_budget
from .trainer import TrainConfig, TrainResult, job_seed
from .work import EvaluateRequest, Request, TrainRequest

if TYPE_CHECKING:
    from .agent import Agent


@dataclass
class Job:
    """What the agent runs for one task: `request` (plain data) on a pool worker, then on the
    agent `settle` keeps what the device keeps of the result (its private tensors, its timing),
    `message` gives the payload published on the device's uplink topic, and `describe` the
    agent's log line for the round (samples, loss, seconds)."""

    request: Request
    message: Callable[[Any], bytes]
    describe: Callable[[Any], str]
    settle: Callable[[Any], None] = lambda result: None


Handler = Callable[["Agent", TaskMessage, ModelMessage], Job]


def _private(agent: Agent, model: ModelMessage) -> dict | None:
    """The device's private tensors for the job, or None for a model that has none (no seeded
    model is built just to find that out)."""
    return agent.private_tensors(model.spec) if private_patterns(model.spec) else None


def train(agent: Agent, task: TaskMessage, model: ModelMessage) -> Job:
    """`train`: local training from the received model; answers with an `update` (tensors in the
    codec the task asks for)."""
    check_train_settings(task.train, agent.profile, len(agent.y), agent.seconds_per_sample)
    check_model(model.tensors, model.version)
    cfg = TrainConfig.resolve(agent.profile, task.train)
    tensors = model.tensors
    request = TrainRequest(
        state=tensors, data=agent.data, cfg=cfg, seed=job_seed(agent.seed, task.round, agent.device_id),
        codec=task.codec, private=_private(agent, model),
        budget=time_budget(agent.profile),
        residual=agent.residual.load(model.spec) if cfg.error_feedback else None,
    )

    def settle(result: TrainResult) -> None:
        if result.private:
            agent.private.save(model.spec, result.private)
        if result.residual:
            agent.residual.save(model.spec, result.residual)
        agent.seconds_per_sample = result.seconds / max(1, cfg.epochs * len(agent.y))

    def message(result: TrainResult) -> bytes:
        state = agent.tamper(tensors, result.state) if agent.tamper is not None else result.state
        return build_update_message(
            fleet=task.fleet, run=task.run, device=agent.device_id, round_id=task.round,
            base_version=task.model_version, tensors=state, num_samples=result.num_samples,
            metrics={"loss": result.loss, "accuracy": result.accuracy, "seconds": result.seconds},
            codec=task.codec or agent.profile.precision, key=agent.device_key,
            model_probs=keep_probs(tensors) if task.codec in CONTEXT_CODECS else None,
        )

    def describe(result: TrainResult) -> str:
        return f"trained on {result.num_samples} samples, loss {result.loss:.4f}, {result.seconds:.1f} s"

    return Job(request, message, describe, settle)


def evaluate(agent: Agent, task: TaskMessage, model: ModelMessage) -> Job:
    """`evaluate`: the model family's metrics (classification: loss, accuracy) of the received
    model (with this device's private tensors, if the model has any) on the local data; answers
    with a `report`, no tensors."""
    batch_size = check_evaluate_params(task.params)
    check_model(model.tensors, model.version)
    request = EvaluateRequest(state=model.tensors, data=agent.data, batch_size=batch_size,
                              private=_private(agent, model))
    started = time.monotonic()

    def message(metrics: dict[str, float]) -> bytes:
        return build_report_message(
            fleet=task.fleet, run=task.run, device=agent.device_id, round_id=task.round,
            base_version=task.model_version, task_kind=task.kind, num_samples=len(agent.y), metrics=metrics,
            key=agent.device_key,
        )

    def describe(metrics: dict[str, float]) -> str:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        return f"evaluated on {len(agent.y)} samples, {scores}, {time.monotonic() - started:.1f} s"

    return Job(request, message, describe)


HANDLERS: dict[str, Handler] = {"train": train, "evaluate": evaluate}
