"""The simulator's training workers (hub/sim/workers.py): worker processes run the same
requests as the agent's own thread pool with the same result, read the devices' data from
shared memory instead of receiving it with every job, survive a worker's death (its jobs fail
with the reason, a new worker takes over) and unmap a fleet's data when the fleet closes."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest


def _request(data, epochs: int = 1, seed: int = 3):  # noqa: ANN001
    from fedge.edge_agent.trainer import TrainConfig
    from fedge.edge_agent.work import TrainRequest
    from fedge.models.registry import build_model, get_state, model_spec

    spec = model_spec("mlp", {"hidden": 32})
    state = get_state(build_model(spec, (1, 28, 28), 10, seed=0))
    return spec, TrainRequest(state=state, data=data, cfg=TrainConfig(epochs=epochs, batch_size=32, lr=0.05),
                              seed=seed, codec="fp32")


class _Waiter:
    def __init__(self, n: int) -> None:
        self.outcomes: list = [None] * n
        self.left = n
        self.event = threading.Event()
        self.lock = threading.Lock()

    def done(self, i: int):  # noqa: ANN201
        def call(outcome) -> None:  # noqa: ANN001
            with self.lock:
                self.outcomes[i] = outcome
                self.left -= 1
                if self.left == 0:
                    self.event.set()
        return call


def test_worker_processes_train_like_the_agents_own_pool_from_shared_memory(small_data) -> None:
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.shared_data import DataArena, LocalData
    from fedge.hub.sim.workers import ProcessPool, share_states

    splits = [small_data.train.subset(np.arange(i * 200, (i + 1) * 200)) for i in range(3)]
    arena = DataArena(splits)
    procs = ProcessPool(workers=2, threads=1)
    local = TrainingPool(workers=1, threads_per_worker=1)
    try:
        shared_reqs = [_request(arena.slices[i], seed=i)[1] for i in range(3)]
        spec, _ = _request(arena.slices[0])
        key = (spec, (1, 28, 28), 10)
        # a request names its data (a few hundred bytes), it does not carry the images
        assert len(pickle.dumps(arena.slices[0])) < 1000 < splits[0].x.nbytes
        # equal received models from three devices pickle as one
        one = len(pickle.dumps([(0, key, shared_reqs[0])]))
        copies = [(i, key, _request(arena.slices[i], seed=i)[1]) for i in range(3)]
        assert len(pickle.dumps(share_states(copies))) < 1.2 * one

        remote, here = _Waiter(3), _Waiter(3)
        for i, request in enumerate(shared_reqs):
            procs.submit(key, request, remote.done(i))
        for i in range(3):
            x, y = splits[i].x, splits[i].y
            import torch

            local.submit(key, _request(LocalData(torch.from_numpy(x), torch.from_numpy(y)), seed=i)[1], here.done(i))
        assert remote.event.wait(120) and here.event.wait(120)
        for a, b in zip(remote.outcomes, here.outcomes):
            assert not isinstance(a, Exception), a
            assert a.num_samples == b.num_samples == 200
            assert a.loss == pytest.approx(b.loss, rel=1e-4)
            for name in b.state:
                np.testing.assert_allclose(a.state[name], b.state[name], rtol=1e-4, atol=1e-5)
        # training changed the model: a real job ran
        assert any(not np.array_equal(remote.outcomes[0].state[k], shared_reqs[0].state[k]) for k in shared_reqs[0].state)
    finally:
        procs.close()
        local.close()
        arena.close()


def test_a_dead_worker_fails_its_jobs_with_the_reason_and_is_replaced(small_data) -> None:
    from fedge.edge_agent.shared_data import DataArena
    from fedge.hub.sim.workers import ProcessPool

    arena = DataArena([small_data.train])
    pool = ProcessPool(workers=1, threads=1)
    try:
        spec, long_job = _request(arena.slices[0], epochs=500)  # minutes: it is killed long before
        key = (spec, (1, 28, 28), 10)
        first = _Waiter(1)
        pool.submit(key, long_job, first.done(0))
        victim = pool.pids()[0]
        deadline = time.monotonic() + 60
        while pool.batches_sent == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the job is running in the worker
        os.kill(victim, signal.SIGKILL)
        assert first.event.wait(30)
        failure = first.outcomes[0]
        assert isinstance(failure, RuntimeError) and "died" in str(failure) and str(victim) in str(failure)

        second = _Waiter(1)
        pool.submit(key, _request(arena.slices[0])[1], second.done(0))
        assert second.event.wait(120)
        assert pool.pids()[0] != victim
        assert second.outcomes[0].num_samples == len(small_data.train)
        time.sleep(1.0)  # the dead worker's resource tracker has had time to clean up after it
        assert os.path.exists(f"/dev/shm/{arena.name}"), "a dead worker took the fleet's data block with it"
    finally:
        pool.close()
        arena.close()


def test_a_closed_fleet_leaves_no_mapping_of_its_data_in_the_shared_workers(small_data, tmp_path) -> None:
    from fedge.hub.config import HubConfig
    from fedge.hub.sim.fleet import Fleet, FleetConfig
    from fedge.hub.sim.workers import shared_process_pool
    from fedge.models.partition import PartitionSpec

    cfg = FleetConfig(devices=3, partition=PartitionSpec(kind="iid"), transport="inproc", runs_dir=str(tmp_path),
                      progress=False, workers=2, threads=2,
                      hub=HubConfig(fleet="workers-forget", model="mlp", rounds=2, deadline_s=60,
                                    train={"lr": 0.05, "batch_size": 32}))
    fleet = Fleet(cfg, dataset=small_data).start()
    try:
        block = fleet.pool.arena.name
        run = fleet.run()
        assert run["final_accuracy"] > 0.5  # 10 classes: chance 0.1
    finally:
        fleet.close()
    pool = shared_process_pool(2, 1, "cpu")  # the same workers, kept for the next fleet
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not any(block in open(f"/proc/{pid}/maps").read() for pid in pool.pids()):
            break
        time.sleep(0.2)
    assert not any(block in open(f"/proc/{pid}/maps").read() for pid in pool.pids())
    assert not os.path.exists(f"/dev/shm/{block}")


def test_an_agent_with_its_own_data_trains_on_worker_processes_too(small_data) -> None:
    """An agent started beside a fleet (not by it) holds its data itself: the request carries it."""
    import torch

    from fedge.edge_agent.shared_data import LocalData
    from fedge.hub.sim.workers import ProcessPool

    pool = ProcessPool(workers=1, threads=1)
    try:
        data = LocalData(torch.from_numpy(small_data.train.x[:300]), torch.from_numpy(small_data.train.y[:300]))
        spec, request = _request(data)
        waiter = _Waiter(1)
        pool.submit((spec, (1, 28, 28), 10), request, waiter.done(0))
        assert waiter.event.wait(120)
        assert not isinstance(waiter.outcomes[0], Exception), waiter.outcomes[0]
        assert waiter.outcomes[0].num_samples == 300
    finally:
        pool.close()


def test_a_worker_stacks_many_small_mlp_jobs_with_the_one_by_one_result(small_data) -> None:
    """run_group (every pool's code path) trains >= MIN_STACK_JOBS MLP jobs as one stack when
    its trainer is not fused, and what each device sends equals its job trained alone; a conv
    model is not stacked on the CPU, nor a fused MLP (one by one is faster)."""
    import torch

    from fedge.edge_agent.shared_data import LocalData
    from fedge.edge_agent.stacked import MIN_STACK_JOBS
    from fedge.edge_agent.trainer import LocalTrainer
    from fedge.edge_agent.work import _stackable_groups, run_group, run_one

    n = max(MIN_STACK_JOBS, 8)
    requests = []
    for i in range(n):
        rows = slice(i * 40, i * 40 + 25 + i)  # different sizes: partial last batches
        data = LocalData(torch.from_numpy(small_data.train.x[rows]), torch.from_numpy(small_data.train.y[rows]))
        spec, request = _request(data, epochs=2, seed=i)
        requests.append(request)
    assert _stackable_groups(LocalTrainer(spec, (1, 28, 28), 10), requests) == [], "fused MLP: one by one"
    trainer = LocalTrainer(spec, (1, 28, 28), 10, fused=False)  # the autograd trainer: stacking pays
    assert _stackable_groups(trainer, requests) == [list(range(n))]
    stacked = run_group(trainer, requests)
    for request, result in zip(requests, stacked):
        alone = run_one(trainer, request)
        assert result.num_samples == alone.num_samples
        for name in alone.state:
            np.testing.assert_allclose(result.state[name], alone.state[name], rtol=1e-4, atol=1e-5)
    conv = LocalTrainer("conv4", (1, 28, 28), 10)
    assert _stackable_groups(conv, requests) == []
