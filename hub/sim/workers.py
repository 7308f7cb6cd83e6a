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
import itertools
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, Listener
from typing import Any, Protocol

import numpy as np

from fedge.edge_agent.pool import Done, TrainingPool
from fedge.edge_agent.shared_data import DataArena, DeviceData
from fedge.edge_agent.work import ModelKey, Outcome, Request
from fedge.models.data import Split
from fedge.models.errors import ConfigError
from fedge.models.registry import Registered, registrations
from fedge.models.spec import ModelSpec

from .worker_proc import WORKER_KEY_ENV

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
        self._inflight: dict[int, dict[int, Done]] = {}  # slot -> {job tag: its device's callback}
        self._tags = itertools.count()
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
                plan = []
                for slot, items in self._plan():
                    self._idle.remove(slot)
                    tagged = [(next(self._tags), key, request, done) for key, request, done in items]
                    self._inflight[slot] = {tag: done for tag, _, _, done in tagged}
                    plan.append((slot, [(tag, key, request) for tag, key, request, _ in tagged]))
            for slot, batch in plan:
                try:
                    self._send(slot, batch)
                    self.batches_sent += 1
                except Exception as exc:  # noqa: BLE001 - the batch fails, the pool goes on
                    log.exception("could not hand a batch to training worker %d", slot)
                    self._complete(slot, [(tag, exc) for tag, _, _ in batch])

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

    def _complete(self, slot: int, outcomes: Sequence[tuple[int, Outcome]]) -> None:
        """A slot's batch is done: free the slot, hand each outcome to the device whose job
        carries its tag (a tag the batch did not hold is logged, never given to another)."""
        with self._cond:
            dones = self._inflight.pop(slot, {})
            if slot not in self._idle:
                self._idle.append(slot)
            self._cond.notify_all()
        for tag, outcome in outcomes:
            done = dones.pop(tag, None)
            if done is None:
                log.error("training worker %d answered job %d, which it was not given", slot, tag)
                continue
            try:
                done(outcome)
            except Exception:  # noqa: BLE001
                log.exception("training completion callback failed")
        for done in dones.values():  # a job the worker did not answer
            done(RuntimeError(f"training worker {slot} returned no result for this job"))

    def _fail_inflight(self, slot: int, reason: str) -> None:
        with self._cond:
            tags = list(self._inflight.get(slot, {}))
        self._complete(slot, [(tag, RuntimeError(reason)) for tag in tags])

    def _send(self, slot: int, batch: list[tuple[int, ModelKey, Request]]) -> None:
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


def own_models(batch: list[tuple[int, ModelKey, Request]]) -> dict[str, Registered]:
    """The program's own model registrations a batch needs (a worker knows only fedge's)."""
    return registrations({key[0].name for _, key, _ in batch})


def share_states(batch: list[tuple[int, ModelKey, Request]]) -> list[tuple[int, ModelKey, Request]]:
    """Requests whose received tensors are equal get one shared dict, so pickle writes the global
    model once per batch instead of once per device (each agent decoded its own copy)."""
    seen: list[dict] = []
    out = []
    for tag, key, request in batch:
        state = request.state
        for known in seen:
            if _same_tensors(known, state):
                request = dataclasses.replace(request, state=known)
                break
        else:
            seen.append(state)  # type: ignore[arg-type]
        out.append((tag, key, request))
    return out


def _same_tensors(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


class ProcessPool(GatheringPool):
    """`workers` training processes (`python -m fedge.hub.sim.worker_proc`: a clean interpreter
    that neither inherits the broker's threads nor re-runs the caller's script), each with
    `threads` torch threads; a worker that dies is replaced and its jobs fail with the reason
    (the devices report them as failed, the hub stops waiting for them)."""

    def __init__(self, workers: int | None = None, threads: int | None = None, device: str = "cpu",
                 gather_s: float = 0.02) -> None:
        workers = workers or default_workers(device)
        super().__init__(workers, gather_s=gather_s)
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.device = device
        self._procs: list[subprocess.Popen | None] = [None] * workers
        self._conns: list[Connection | None] = [None] * workers
        self._send_locks = [threading.Lock() for _ in range(workers)]  # one writer at a time per pipe
        for slot in range(workers):
            self._spawn(slot)
        self.start()

    def _spawn(self, slot: int) -> None:
        authkey = secrets.token_bytes(32)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            env = {**os.environ, WORKER_KEY_ENV: authkey.hex()}
            proc = subprocess.Popen([sys.executable, "-m", "fedge.hub.sim.worker_proc", str(listener.address),
                                     str(self.threads), self.device], env=env)
            conn = _accept(listener, proc, slot)
        self._procs[slot], self._conns[slot] = proc, conn
        threading.Thread(target=self._read, args=(slot, conn), name=f"fedge-results-{slot}", daemon=True).start()

    def _send(self, slot: int, batch: list[tuple[int, ModelKey, Request]]) -> None:
        self._post(slot, (own_models(batch), share_states(batch)))

    def _post(self, slot: int, message: Any) -> None:
        """Send one message down worker `slot`'s pipe. The dispatcher and the fleet's own thread
        (forget, close) both write; interleaved writes would corrupt the stream."""
        conn = self._conns[slot]
        assert conn is not None
        with self._send_locks[slot]:
            conn.send(message)

    def _post_all(self, message: Any) -> None:
        """`message` to every worker; one whose pipe is gone (dying, replaced) is skipped."""
        for slot in range(self.slots):
            try:
                self._post(slot, message)
            except (OSError, ValueError, AssertionError):
                pass

    def _read(self, slot: int, conn: Connection) -> None:
        while True:
            try:
                outcomes = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(outcomes, str):  # the worker could not read the batch: every job of it fails so
                self._fail_inflight(slot, outcomes)
            else:
                self._complete(slot, outcomes)
        if self._closed:
            return
        proc = self._procs[slot]
        assert proc is not None
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        reason = f"training worker {slot} (pid {proc.pid}) died with exit code {code}"
        log.error("%s; starting a new one", reason)
        self._spawn(slot)
        self._fail_inflight(slot, reason)

    def forget(self, block: str) -> None:
        """The data block `block` is gone: each worker unmaps it (after the batches sent before)."""
        self._post_all(block)

    def pids(self) -> list[int]:
        """The worker processes' ids (benchmarks sample their memory)."""
        return [p.pid for p in self._procs if p is not None]

    def close(self) -> None:
        super().close()
        self._post_all(None)
        for proc in self._procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for conn in self._conns:
            if conn is not None:
                conn.close()


def _accept(listener: Listener, proc: subprocess.Popen, slot: int, timeout: float = 120.0) -> Connection:
    """The new worker's connection; an error naming the worker if it exits or stays silent."""
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(_try(listener.accept)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + timeout
    while waiter.is_alive() and proc.poll() is None and time.monotonic() < deadline:
        waiter.join(0.05)
    if got and isinstance(got[0], Connection):
        return got[0]
    proc.kill()
    why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"did not connect in {timeout:.0f} s"
    raise RuntimeError(f"training worker {slot} (python -m fedge.hub.sim.worker_proc) {why}")


def _try(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001
        return exc


_SHARED: list[tuple[tuple, ProcessPool]] = []  # this process's worker processes, kept between fleets


@atexit.register
def _close_shared() -> None:
    while _SHARED:
        _SHARED.pop()[1].close()


def shared_process_pool(workers: int, threads: int | None, device: str) -> ProcessPool:
    """The worker processes of this Python process, started once and reused by every fleet that
    asks for the same shape (a grid of runs, a test session: no start-up per run); another shape
    replaces them. They stop when the process exits."""
    key = (workers, threads, device)
    if _SHARED and _SHARED[0][0] == key and not _SHARED[0][1].closed:
        return _SHARED[0][1]
    _close_shared()
    pool = ProcessPool(workers=workers, threads=threads, device=device)
    _SHARED.append((key, pool))
    return pool


class FleetPool(Protocol):
    """What a fleet trains with: a Pool that also places the devices' data where its workers
    read it (`place`: the splits the agents keep and, per device, the reference a request carries)."""

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None: ...

    def place(self, splits: list[Split]) -> tuple[list[Split], list[DeviceData | None]]: ...

    def close(self) -> None: ...


class ProcessLease:
    """A fleet's use of this process's shared worker processes: its data goes into one
    shared-memory block; close() unmaps and removes that block, the workers stay."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.arena: DataArena | None = None

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None:
        self.pool.submit(model_key, request, done)

    def place(self, splits: list[Split]) -> tuple[list[Split], list[DeviceData | None]]:
        self.arena = DataArena(splits)
        return [self.arena.split(i) for i in range(len(splits))], list(self.arena.slices)

    def close(self) -> None:
        if self.arena is not None:
            self.pool.forget(self.arena.name)
            self.arena.close()
            self.arena = None


class ThreadLease:
    """The agent's own thread pool inside the fleet process (`--backend thread`): data by reference."""

    def __init__(self, pool: TrainingPool) -> None:
        self.pool = pool

    def submit(self, model_key: ModelKey, request: Request, done: Done) -> None:
        self.pool.submit(model_key, request, done)

    def place(self, splits: list[Split]) -> tuple[list[Split], list[DeviceData | None]]:
        return splits, [None] * len(splits)

    def close(self) -> None:
        self.pool.close()


def process_unsafe(model: ModelSpec) -> str | None:
    """Why worker processes cannot build `model` (None: they can): a model class defined in the
    running script (`__main__`) cannot be imported by another process."""
    reg = registrations([model.name]).get(model.name)
    if reg is not None and getattr(reg.build, "__module__", None) == "__main__":
        return f"model {model.name!r} is defined in the running script (__main__), which worker processes cannot import"
    return None


def make_pool(backend: str, workers: int | None, threads: int | None, device: str) -> FleetPool:
    """The fleet's pool for `backend`: process (default), thread (the agent's own pool, in the
    fleet process; e.g. to debug a job) or ray. `threads`: torch threads in total (None: all cores)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "thread":
        workers = workers or 1
        total = threads or os.cpu_count() or 1
        return ThreadLease(TrainingPool(workers, max(1, total // workers), device))
    if backend == "ray":
        from .ray_workers import RayPool  # noqa: PLC0415 - Ray is optional

        return RayPool(workers=workers, threads=max(1, threads // workers) if threads and workers else None,
                       device=device)
    workers = workers or default_workers(device)
    return ProcessLease(shared_process_pool(workers, max(1, threads // workers) if threads else None, device))
