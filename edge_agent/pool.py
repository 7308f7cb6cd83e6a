"""The training pool of a standalone agent: worker threads in the agent's own process, each
with its own resident trainer per model.

A pool is anything with `submit(key, request, done)` and `close()` (`Pool`): this one, or the
fleet simulator's worker processes and Ray actors (hub/sim/workers.py), which run the same
requests through the same `work.run_group`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from fedge.models.errors import ConfigError

from .work import ModelKey, Outcome, Request, Worker

log = logging.getLogger("fedge.pool")

Done = Callable[[Outcome], None]


class Pool(Protocol):
    """Runs requests of the agents that share it; `done` gets the result or the exception."""

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None: ...

    def close(self) -> None: ...


class TrainingPool:
    def __init__(self, workers: int = 1, threads_per_worker: int | None = None, device: str = "cpu") -> None:
        if workers < 1:
            raise ConfigError("a training pool needs at least one worker")
        if threads_per_worker:
            torch.set_num_threads(threads_per_worker * workers)
        self.device = device
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._work, name=f"fedge-train-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None:
        """Run `request` on a worker with the trainer of `model_key` (spec, in_shape,
        num_classes); `done` gets the result or the exception raised."""
        self._jobs.put((model_key, request, done))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def _work(self) -> None:
        worker = Worker(self.device)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            key, request, done = item
            result: Any = worker.run([(key, request)])[0]  # an exception is handed to the caller, who reports it
            try:
                done(result)
            except Exception:  # noqa: BLE001
                log.exception("training completion callback failed")
