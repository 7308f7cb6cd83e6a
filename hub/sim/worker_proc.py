"""A training worker process of the fleet simulator (hub/sim/workers.py ProcessPool starts it):
`python -m fedge.hub.sim.worker_proc ADDRESS THREADS DEVICE`, the connection key in the
FEDGE_WORKER_KEY environment variable. It connects back first (a light import), then loads
torch and serves batches until the pool says stop or goes away.
"""

from __future__ import annotations

import os
import pickle
import sys
from multiprocessing.connection import Client

WORKER_KEY_ENV = "FEDGE_WORKER_KEY"  # the connection key: in the worker's environment, not on its command line


def main(argv: list[str]) -> int:
    address, threads, device = argv[0], int(argv[1]), argv[2]
    conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop(WORKER_KEY_ENV)))

    from fedge.edge_agent.shared_data import forget_block  # noqa: PLC0415 - after connecting: torch is slow to load
    from fedge.edge_agent.work import Worker, set_worker_threads  # noqa: PLC0415

    set_worker_threads(threads)
    worker = Worker(device)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):  # the fleet is gone
            return 0
        except Exception as exc:  # noqa: BLE001 - e.g. a model class this process cannot import
            conn.send(f"the training worker could not read its batch: {type(exc).__name__}: {exc}")
            continue
        if batch is None:
            return 0
        if isinstance(batch, str):  # a data block the simulator has closed: drop this worker's mapping
            forget_block(batch)
            continue
        models, tagged = batch
        conn.send([(tag, _picklable(outcome)) for tag, outcome in worker.run_tagged(tagged, models)])


def _picklable(outcome: object) -> object:
    """An exception that pickle cannot carry comes back as a RuntimeError with its text."""
    if isinstance(outcome, BaseException):
        try:
            pickle.dumps(outcome)
        except Exception:  # noqa: BLE001
            return RuntimeError(f"{type(outcome).__name__}: {outcome}")
    return outcome


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
