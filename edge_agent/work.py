"""The work a device hands to a training worker, as plain data, and the one function that runs it.

A request carries everything the work needs (received tensors, the device's data or a reference
to it in shared memory, settings, seed) and nothing of the agent, so any pool runs it the same
way: a thread beside the agent, a worker process of the fleet simulator, or a Ray actor on
another machine. `run_group` is that one code path: it trains requests of one model one by one,
or stacked together (edge_agent/stacked.py) where that gives the same result faster.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedge.models.registry import Registered, adopt, split_state
from fedge.models.spec import ModelSpec
from fedge.models.wire.codecs import UPDATE_CARRIES

from .shared_data import DeviceData
from .stacked import StackJob, prefer_stacked, train_stacked
from .task_checks import TimeBudget
from .trainer import LocalTrainer, TrainConfig, TrainResult, uplink_state

log = logging.getLogger("fedge.work")

ModelKey = tuple[ModelSpec, tuple[int, ...], int]  # (spec, input shape, classes): one resident trainer each


@dataclass
class TrainRequest:
    """`train`: local training from `state` (the received shared tensors) plus the device's
    `private` ones; the result's state is what goes up, as `codec` says (trainer.uplink_state)."""

    state: Mapping[str, np.ndarray]
    data: DeviceData
    cfg: TrainConfig
    seed: int
    codec: str | None
    private: Mapping[str, np.ndarray] | None = None
    budget: TimeBudget | None = None
    residual: Mapping[str, np.ndarray] | None = None  # error feedback kept by the device (cfg.error_feedback)


@dataclass
class EvaluateRequest:
    """`evaluate`: the family's metrics of `state` (+ `private`) on the device's data."""

    state: Mapping[str, np.ndarray]
    data: DeviceData
    batch_size: int
    private: Mapping[str, np.ndarray] | None = None


Request = TrainRequest | EvaluateRequest
Outcome = Any  # TrainResult, a metrics dict, or the exception the work raised


def run_one(trainer: LocalTrainer, request: Request) -> TrainResult | dict[str, float]:
    """One request on this worker's resident trainer of the request's model."""
    x, y = request.data.tensors()
    if isinstance(request, EvaluateRequest):
        return trainer.evaluate(request.state, x, y, private=request.private, batch_size=request.batch_size)
    result = trainer.train(request.state, x, y, request.cfg, request.seed, after_step=request.budget,
                           private=request.private)
    result.state = uplink_state(trainer, result, request.codec, request.state, request.cfg, request.seed,
                                request.residual)
    return result


def run_group(trainer: LocalTrainer, requests: Sequence[Request]) -> list[Outcome]:
    """Every request of one model, in order: an outcome each (a failure is that request's
    exception, the others still run). Train requests with the same settings are stacked when
    stacked training reproduces the one-by-one result and is faster (stacked.prefer_stacked:
    not for a plain MLP on the CPU, which LocalTrainer.train's fused step trains faster)."""
    outcomes: list[Outcome] = [None] * len(requests)
    stacked: set[int] = set()
    for indices in _stackable_groups(trainer, requests):
        group = [requests[i] for i in indices]
        try:
            results = _train_stacked(trainer, group)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the whole group shares the failure (e.g. its time budget)
            results = [exc] * len(group)
        for i, result in zip(indices, results):
            outcomes[i] = result
        stacked.update(indices)
    for i in (i for i in range(len(requests)) if i not in stacked):
        try:
            outcomes[i] = run_one(trainer, requests[i])
        except Exception as exc:  # noqa: BLE001 - reported by the device that asked, the worker goes on
            log.debug("training job failed", exc_info=True)
            outcomes[i] = exc
    return outcomes


def _stackable_groups(trainer: LocalTrainer, requests: Sequence[Request]) -> list[list[int]]:
    """Indices of train requests that can train as one stack: same settings, a codec that
    sends the trained state or its change (a mask codec reads the model's own masks)."""
    by_settings: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        if isinstance(request, TrainRequest) and UPDATE_CARRIES.get(request.codec or "", "state") != "mask":
            by_settings.setdefault((request.cfg, request.budget), []).append(i)
    groups = []
    for (cfg, _budget), indices in by_settings.items():
        if len(indices) > 1 and prefer_stacked(trainer.model, trainer.family, cfg, len(indices),
                                                    fused=trainer.fused):
            groups.append(indices)
    return groups


def _train_stacked(trainer: LocalTrainer, group: Sequence[TrainRequest]) -> list[TrainResult]:
    jobs = []
    for request in group:
        x, y = request.data.tensors()
        jobs.append(StackJob(state={**request.state, **(request.private or {})}, x=x, y=y, seed=request.seed))
    results = train_stacked(trainer.model, trainer.family, jobs, group[0].cfg, after_step=group[0].budget)
    for request, result in zip(group, results):
        trained, kept = split_state(trainer.spec, result.state)
        result.state, result.private = dict(trained), dict(kept)
        result.state = uplink_state(trainer, result, request.codec, request.state, request.cfg, request.seed,
                                request.residual)
    return results


class Worker:
    """A training worker's resident trainers (one per model, built on first use) and the body of
    its loop: a batch of (model key, request) in, one outcome per request out, in order. The
    agent's thread pool, the simulator's worker processes and its Ray actors all run this."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.trainers: dict[ModelKey, LocalTrainer] = {}

    def run(self, batch: Sequence[tuple[ModelKey, Request]],
            models: Mapping[str, Registered] | None = None) -> list[Outcome]:
        """`models`: registrations of the program's own models the batch uses (registry.registrations)."""
        adopt(models or {})
        outcomes: list[Outcome] = [None] * len(batch)
        by_key: dict[ModelKey, list[int]] = {}
        for i, (key, _) in enumerate(batch):
            by_key.setdefault(key, []).append(i)
        for key, indices in by_key.items():
            try:
                if key not in self.trainers:
                    self.trainers[key] = LocalTrainer(key[0], key[1], key[2], device=self.device)
                results = run_group(self.trainers[key], [batch[i][1] for i in indices])
            except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be built: each request says so
                log.debug("training batch failed", exc_info=True)
                results = [exc] * len(indices)
            for i, result in zip(indices, results):
                outcomes[i] = result
        return outcomes

    def run_tagged(self, batch: Sequence[tuple[int, ModelKey, Request]],
                   models: Mapping[str, Registered] | None = None) -> list[tuple[int, Outcome]]:
        """`run` for a pool's batch, whose jobs carry the pool's tags: each outcome goes back
        with its job's tag (hub/sim/workers.py hands it to that job's device)."""
        outcomes = self.run([(key, request) for _, key, request in batch], models)
        return [(tag, outcome) for (tag, _, _), outcome in zip(batch, outcomes)]


def set_worker_threads(threads: int | None) -> None:
    """torch's intra-op threads of this worker (a process worker's own; None: leave torch's)."""
    if threads:
        torch.set_num_threads(int(threads))
