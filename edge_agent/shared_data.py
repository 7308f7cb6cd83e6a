"""A device's training data as a training worker reaches it: in the same process, or in one
shared-memory block that all of a simulator's worker processes map once.

The fleet simulator puts every virtual device's partition into one `DataArena`; the agents
train from views into it, and a request to a worker process carries a `SharedSlice` (a name
and offsets, a few dozen bytes) instead of pickling the images with every job.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Protocol

import numpy as np
import torch

from fedge.models.data import Split

log = logging.getLogger("fedge.shared_data")


class DeviceData(Protocol):
    """Where a request's (x, y) are: `tensors()` gives them in the worker that runs it."""

    @property
    def samples(self) -> int: ...

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class LocalData:
    """Tensors held by reference: a thread pool in the agent's own process."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def samples(self) -> int:
        return int(len(self.y))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def __reduce__(self) -> tuple:
        """Sent to another process (an agent whose data is not in a DataArena, e.g. one started
        beside a fleet): by value, as arrays, not by torch's shared-memory handles, which only
        a process of the same multiprocessing family may open."""
        return (_local_from_arrays, (self.x.numpy(), self.y.numpy()))


def _local_from_arrays(x: np.ndarray, y: np.ndarray) -> LocalData:
    return LocalData(torch.from_numpy(x), torch.from_numpy(y))


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}  # blocks this process has mapped, by name


@dataclass(frozen=True)
class SharedSlice:
    """One device's (x, y) inside a DataArena block: the block's name and where the arrays are."""

    block: str
    x_offset: int
    x_shape: tuple[int, ...]
    x_dtype: str
    y_offset: int
    y_shape: tuple[int, ...]
    y_dtype: str

    @property
    def samples(self) -> int:
        return int(self.y_shape[0])

    def views(self, buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) as arrays over the block's buffer `buf`: no copy."""
        x = np.ndarray(self.x_shape, dtype=self.x_dtype, buffer=buf, offset=self.x_offset)
        y = np.ndarray(self.y_shape, dtype=self.y_dtype, buffer=buf, offset=self.y_offset)
        return x, y

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        shm = _ATTACHED.get(self.block)
        if shm is None:
            shm = _ATTACHED[self.block] = _attach(self.block)
        return self.views(shm.buf)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.arrays()
        return torch.from_numpy(x), torch.from_numpy(y)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map a block the simulator owns. Python < 3.13 registers every mapped block with this
    process's resource tracker, which unlinks it when this process ends: a worker that died
    (or was replaced) would take the fleet's data with it. The owner alone may unlink it."""
    shm = shared_memory.SharedMemory(name=name)
    if sys.version_info < (3, 13):
        from multiprocessing import resource_tracker  # noqa: PLC0415

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def forget_block(name: str) -> None:
    """Unmap a block this process attached (its owner has unlinked it or is about to)."""
    shm = _ATTACHED.pop(name, None)
    if shm is not None:
        try:
            shm.close()
        except BufferError:  # a view is still alive (a job in this worker): the mapping goes with it
            pass


class DataArena:
    """Every device's split in one shared-memory block, owned (and unlinked) by the simulator."""

    def __init__(self, splits: list[Split]) -> None:
        layout: list[tuple[int, int]] = []
        size = 0
        for split in splits:
            x_at = _aligned(size)
            y_at = _aligned(x_at + split.x.nbytes)
            size = y_at + split.y.nbytes
            layout.append((x_at, y_at))
        self._shm = shared_memory.SharedMemory(create=True, size=max(1, size))
        self.name = self._shm.name
        self.slices: list[SharedSlice] = []
        for split, (x_at, y_at) in zip(splits, layout):
            ref = SharedSlice(self._shm.name, x_at, tuple(split.x.shape), split.x.dtype.str,
                              y_at, tuple(split.y.shape), split.y.dtype.str)
            x, y = ref.views(self._shm.buf)
            x[...] = split.x
            y[...] = split.y
            self.slices.append(ref)
        self.nbytes = size

    def split(self, i: int) -> Split:
        """Device i's data as views into the block (no copy in the simulator either)."""
        x, y = self.slices[i].views(self._shm.buf)
        return Split(x, y)

    def close(self) -> None:
        """Unlink the block; views handed out must not be used afterwards."""
        try:
            self._shm.close()
        except BufferError:  # views still alive in this process: the mapping goes with the process
            log.debug("shared data block %s still has views; unlinking only", self._shm.name)
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


def _aligned(offset: int, to: int = 64) -> int:
    return (offset + to - 1) // to * to
