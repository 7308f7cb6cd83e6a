"""The simulator's training workers: processes beside the fleet (default) or Ray actors.

Virtual devices submit plain-data requests (edge_agent/work.py); a dispatcher thread gathers
what arrives together (a round's selected devices get the model within milliseconds of each
other), splits it over the idle workers balanced by samples, and sends each worker one batch.
A worker runs its batch through `work.run_group`, the code path of every pool, which trains a
group of small devices as one stack where that is faster. The MQTT side (broker, hub,
agents' links) stays in the fleet process and never waits on training: the GIL is not shared.

Data is not pickled per job: a fleet's partitions live in one shared-memory block
(edge_agent/shared_data.py) that each worker maps once. The global model, the same for every
device of a round, travels once per batch (requests with equal tensors share one object, which
pickle then writes once).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fedge.edge_agent.pool import Done, Pool, TrainingPool
from fedge.edge_agent.shared_data import forget_block
from fedge.edge_agent.work import ModelKey, Outcome, Request, run_group, set_worker_threads
from fedge.models.errors import ConfigError

log = logging.getLogger("fedge.workers")

Item = tuple[ModelKey, Request, Done]
BACKENDS = ("process", "thread", "ray")


def default_workers(device: str = "cpu") -> int:
    """One worker per core on the CPU; one on a GPU (the workers would share one device)."""
    return 1 if device == "cuda" else max(1, os.cpu_count() or 1)


def samples(request: Request) -> int:
    return request.data.samples


class GatheringPool:
    """Batches submitted requests onto worker slots; subclasses say how a batch reaches a slot
    (`_send`) and call `_complete` with its outcomes. `gather_s`: how long the dispatcher waits
    for the next submission before sending what it has (capped at `max_gather_s`)."""

    def __init__(self, slots: int, gather_s: float = 0.02, max_gather_s: float = 0.25) -> None:
        if slots < 1:
            raise ConfigError("a training pool needs at least one worker")
        self.slots = slots
        self.gather_s = gather_s
        self.max_gather_s = max_gather_s
        self._pending: list[Item] = []
        self._idle = list(range(slots))
        self._inflight: dict[int, list[Done]] = {}
        self._cond = threading.Condition()
        self._last_submit = 0.0
        self._closed = False
        self.batches_sent = 0
        self._dispatcher = threading.Thread(target=self._dispatch, name="fedge-dispatch", daemon=True)

    def start(self) -> GatheringPool:
        self._dispatcher.start()
        return self

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the training pool is closed")
            self._pending.append((model_key, request, done))
            self._last_submit = time.monotonic()
            self._cond.notify_all()

    # -- dispatching -----------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._pending and self._idle):
                    self._cond.wait()
                if self._closed:
                    return
                first = time.monotonic()
                while not self._closed:
                    now = time.monotonic()
                    quiet = now - self._last_submit
                    if quiet >= self.gather_s or now - first >= self.max_gather_s:
                        break
                    self._cond.wait(timeout=min(self.gather_s - quiet, self.max_gather_s - (now - first)))
                plan = self._plan()
                for slot, items in plan:
                    self._idle.remove(slot)
                    self._inflight[slot] = [done for _, _, done in items]
            for slot, items in plan:
                try:
                    self._send(slot, [(key, request) for key, request, _ in items])
                    self.batches_sent += 1
                except Exception as exc:  # noqa: BLE001 - the batch fails, the pool goes on
                    log.exception("could not hand a batch to training worker %d", slot)
                    self._complete(slot, [exc] * len(items))

    def _plan(self) -> list[tuple[int, list[Item]]]:
        """Split the pending requests into one share per worker (largest first onto the lightest
        share, by samples), and give the idle workers their shares; the rest waits for the busy."""
        shares: list[list[Item]] = [[] for _ in range(self.slots)]
        loads = [0] * self.slots
        for item in sorted(self._pending, key=lambda it: -samples(it[1])):
            lightest = loads.index(min(loads))
            shares[lightest].append(item)
            loads[lightest] += samples(item[1])
        shares = [s for s in shares if s]
        given = list(zip(self._idle, shares))
        handed = {id(item) for _, share in given for item in share}
        self._pending = [item for item in self._pending if id(item) not in handed]
        return given

    def _complete(self, slot: int, outcomes: Sequence[Outcome]) -> None:
        """A slot's batch is done (outcomes in the batch's order): free the slot, tell each device."""
        with self._cond:
            dones = self._inflight.pop(slot, [])
            if slot not in self._idle:
                self._idle.append(slot)
            self._cond.notify_all()
        for done, outcome in zip(dones, outcomes):
            try:
                done(outcome)
            except Exception:  # noqa: BLE001
                log.exception("training completion callback failed")

    def _fail_inflight(self, slot: int, reason: str) -> None:
        with self._cond:
            count = len(self._inflight.get(slot, []))
        self._complete(slot, [RuntimeError(reason)] * count)

    def _send(self, slot: int, batch: list[tuple[ModelKey, Request]]) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for _, _, done in pending:
            done(RuntimeError("the training pool closed before this job ran"))


def share_states(batch: list[tuple[ModelKey, Request]]) -> list[tuple[ModelKey, Request]]:
    """Requests whose received tensors are equal get one shared dict, so pickle writes the global
    model once per batch instead of once per device (each agent decoded its own copy)."""
    seen: list[dict] = []
    out = []
    for key, request in batch:
        state = request.state
        for known in seen:
            if _same_tensors(known, state):
                request = dataclasses.replace(request, state=known)
                break
        else:
            seen.append(state)  # type: ignore[arg-type]
        out.append((key, request))
    return out


def _same_tensors(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# -- worker processes --------------------------------------------------------------------

def _worker_main(conn: Connection, threads: int | None, device: str) -> None:
    """A worker process: resident trainers by model, batches in, outcomes out, until told to stop."""
    from fedge.edge_agent.trainer import LocalTrainer  # noqa: PLC0415

    set_worker_threads(threads)
    trainers: dict[ModelKey, LocalTrainer] = {}
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        if isinstance(batch, str):  # a data block the simulator has closed: drop this worker's mapping
            forget_block(batch)
            continue
        outcomes: list[Outcome] = [None] * len(batch)
        by_key: dict[ModelKey, list[int]] = {}
        for i, (key, _) in enumerate(batch):
            by_key.setdefault(key, []).append(i)
        for key, indices in by_key.items():
            try:
                if key not in trainers:
                    trainers[key] = LocalTrainer(key[0], key[1], key[2], device=device)
                results = run_group(trainers[key], [batch[i][1] for i in indices])
            except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be built: each job says so
                results = [exc] * len(indices)
            for i, result in zip(indices, results):
                outcomes[i] = result
        conn.send([_picklable(o) for o in outcomes])


def _picklable(outcome: Outcome) -> Outcome:
    if isinstance(outcome, BaseException):
        try:
            pickle.dumps(outcome)
        except Exception:  # noqa: BLE001
            return RuntimeError(f"{type(outcome).__name__}: {outcome}")
    return outcome


class ProcessPool(GatheringPool):
    """`workers` training processes (spawned: a clean interpreter, no inherited broker threads),
    each with `threads` torch threads; a worker that dies is replaced and its jobs fail with
    the reason (the devices report them as failed, the hub stops waiting for them)."""

    def __init__(self, workers: int | None = None, threads: int | None = None, device: str = "cpu",
                 gather_s: float = 0.02) -> None:
        workers = workers or default_workers(device)
        super().__init__(workers, gather_s=gather_s)
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.device = device
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = [None] * workers
        self._conns: list[Connection | None] = [None] * workers
        self._readers: list[threading.Thread | None] = [None] * workers
        for slot in range(workers):
            self._spawn(slot)
        self.start()

    def _spawn(self, slot: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.threads, self.device),
                                 name=f"fedge-train-{slot}", daemon=True)
        proc.start()
        child.close()
        self._procs[slot], self._conns[slot] = proc, parent
        reader = threading.Thread(target=self._read, args=(slot, parent), name=f"fedge-results-{slot}", daemon=True)
        self._readers[slot] = reader
        reader.start()

    def _send(self, slot: int, batch: list[tuple[ModelKey, Request]]) -> None:
        conn = self._conns[slot]
        assert conn is not None
        conn.send(share_states(batch))

    def _read(self, slot: int, conn: Connection) -> None:
        while True:
            try:
                outcomes = conn.recv()
            except (EOFError, OSError):
                break
            self._complete(slot, outcomes)
        if self._closed:
            return
        proc = self._procs[slot]
        proc.join(timeout=5)
        reason = f"training worker {slot} (pid {proc.pid}) died with exit code {proc.exitcode}"
        log.error("%s; starting a new one", reason)
        self._spawn(slot)
        self._fail_inflight(slot, reason)

    def forget(self, block: str) -> None:
        """The data block `block` is gone: each worker unmaps it (after the batches sent before)."""
        for conn in self._conns:
            try:
                if conn is not None:
                    conn.send(block)
            except (OSError, ValueError):
                pass

    def pids(self) -> list[int]:
        """The worker processes' ids (benchmarks sample their memory)."""
        return [p.pid for p in self._procs if p is not None]

    def close(self) -> None:
        super().close()
        for conn in self._conns:
            try:
                if conn is not None:
                    conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        for conn in self._conns:
            if conn is not None:
                conn.close()


_SHARED: list[tuple[tuple, ProcessPool]] = []  # this process's worker processes, kept between fleets


def shared_process_pool(workers: int, threads: int | None, device: str) -> ProcessPool:
    """The worker processes of this Python process, started once and reused by every fleet that
    asks for the same shape (a grid of runs, a test session: no start-up per run); another shape
    replaces them. They stop when the process exits."""
    key = (workers, threads, device)
    if _SHARED and _SHARED[0][0] == key and not _SHARED[0][1].closed:
        return _SHARED[0][1]
    while _SHARED:
        _SHARED.pop()[1].close()
    pool = ProcessPool(workers=workers, threads=threads, device=device)
    _SHARED.append((key, pool))
    return pool


@atexit.register
def _close_shared() -> None:
    while _SHARED:
        _SHARED.pop()[1].close()


class Lease:
    """A fleet's use of a shared pool: submits go through; close() only unmaps the fleet's data."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.block: str | None = None  # the fleet's DataArena, unmapped by the workers on close

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None:
        self.pool.submit(model_key, request, done)

    def close(self) -> None:
        if self.block:
            self.pool.forget(self.block)


def make_pool(backend: str, workers: int | None, threads: int | None, device: str) -> Pool:
    """The fleet's pool for `backend`: process (default), thread (the agent's own pool, in the
    fleet process; e.g. to debug a job) or ray. `threads`: torch threads in total (0/None: all cores)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "thread":
        workers = workers or 1
        total = threads or os.cpu_count() or 1
        return TrainingPool(workers, max(1, total // workers), device)
    if backend == "ray":
        from .ray_workers import RayPool  # noqa: PLC0415 - Ray is optional

        return RayPool(workers=workers, threads=threads, device=device)  # type: ignore[return-value]
    workers = workers or default_workers(device)
    return Lease(shared_process_pool(workers, max(1, threads // workers) if threads else None, device))
