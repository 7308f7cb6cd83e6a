"""Training workers as Ray actors (`fedge fleet --backend ray`): when one machine is not enough.

Only the training moves: the hub, the broker and every virtual device's MQTT connection stay in
the fleet process, exactly as with worker processes. Each actor keeps its resident trainers
and runs batches through the same `work.run_group`. The devices' data go into Ray's object
store once (`place`); an actor fetches a device's data the first time it trains it and keeps
it. Without RAY_ADDRESS (or `address`), Ray starts a local cluster on this machine; with it,
the actors run on the cluster's nodes (docs/operations.md, "A fleet across machines with Ray").
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedge.edge_agent.shared_data import DeviceData
from fedge.edge_agent.work import ModelKey, Outcome, Request, Worker, set_worker_threads
from fedge.models.data import Split
from fedge.models.errors import ConfigError

from .workers import GatheringPool, own_models, share_states

log = logging.getLogger("fedge.ray")

try:
    import ray
except ImportError:  # optional: pip install 'fedge[ray]'
    ray = None

_FETCHED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device data an actor has fetched, by object id


@dataclass(frozen=True)
class RayData:
    """One device's (x, y) in Ray's object store."""

    ref: Any  # ray.ObjectRef of (x, y)
    samples: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.ref.hex()
        if key not in _FETCHED:
            x, y = ray.get(self.ref)  # read-only zero-copy views on this node: one writable copy, kept
            _FETCHED[key] = (torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))
        return _FETCHED[key]


class _Trainer:
    """The actor: a training worker on some node of the cluster."""

    def __init__(self, threads: int | None, device: str) -> None:
        set_worker_threads(threads)
        self.worker = Worker(device)

    def run(self, models: dict[str, Any], batch: list[tuple[int, ModelKey, Request]]) -> list[tuple[int, Outcome]]:
        return self.worker.run_tagged(batch, models)

    def node(self) -> str:
        return f"{os.uname().nodename}:{os.getpid()}"


def require_ray() -> Any:
    if ray is None:
        raise ConfigError("--backend ray needs Ray: pip install 'fedge[ray]' (or pip install ray)")
    return ray


class RayPool(GatheringPool):
    """`workers` actors (default: one per CPU of the cluster), each with `threads` torch threads
    and one CPU of Ray's (a GPU each with device cuda). An actor that dies fails its batch with
    the reason and is replaced."""

    def __init__(self, workers: int | None = None, threads: int | None = None, device: str = "cpu",
                 address: str | None = None) -> None:
        require_ray()
        if not ray.is_initialized():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = workers or (1 if device == "cuda" else max(1, cpus))
        super().__init__(workers)
        self.threads = threads or 1
        self.device = device
        self._actor_cls = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(_Trainer)
        self._actors = [self._new_actor() for _ in range(workers)]
        self.start()
        log.info("Ray backend: %d training actors on a cluster of %d CPUs", workers, cpus)

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self.threads, self.device)

    def place(self, splits: list[Split]) -> tuple[list[Split], list[DeviceData | None]]:
        refs: list[DeviceData | None] = []
        for split in splits:
            ref = ray.put((split.x, split.y))
            refs.append(RayData(ref, len(split)))
        return splits, refs

    def _send(self, slot: int, batch: list[tuple[int, ModelKey, Request]]) -> None:
        future = self._actors[slot].run.remote(own_models(batch), share_states(batch)).future()
        future.add_done_callback(lambda f: self._finished(slot, f))

    def _finished(self, slot: int, future: Any) -> None:
        try:
            outcomes = future.result()
        except Exception as exc:  # noqa: BLE001 - the actor died (or could not unpickle): replace it
            reason = f"Ray training actor {slot} failed: {type(exc).__name__}: {exc}"
            log.error("%s; starting a new one", reason)
            self._actors[slot] = self._new_actor()
            self._fail_inflight(slot, reason)
            return
        threading.Thread(target=self._complete, args=(slot, outcomes), daemon=True).start()

    def nodes(self) -> list[str]:
        """Where the actors run (host:pid each)."""
        return ray.get([actor.node.remote() for actor in self._actors])

    def close(self) -> None:
        super().close()
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
