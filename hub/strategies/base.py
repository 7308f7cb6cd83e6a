"""What every aggregation strategy is: a small object the hub builds once per run.

A strategy says what a device sends (`sends`) and in which uplink codec (`codec`); the hub
puts the codec in each round's task, and the device reads from the codec alone what to send
(models/wire/codecs.py UPDATE_CARRIES), so the uplink is decided in one place. It may add
settings to the task's `train` (FedProx's mu), refuse a model it cannot move (mpt-mask),
and keep server state across rounds (FedAvgM's momentum), which the hub checkpoints with
the model and hands back on `--resume`.

Unlike Flower's Strategy, which also owns client selection, evaluation and the fit/evaluate
configuration, this one only aggregates: selection, deadlines and stop rules are the round
engine's (hub/rounds.py) and apply to every strategy alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec
from fedge.models.wire.codecs import UPDATE_CARRIES

from .utils import State, Update

SENDS = ("state", "mask", "sign")  # a device's trained state; its 0/1 masks; the signs of its change


class Strategy(ABC):
    """Turns a round's accepted updates into the next global model.

    Subclasses set `name`, optionally `sends`/`codec`, and implement `aggregate`. Parameters go
    in the constructor (validated there, ConfigError naming the bad one)."""

    name: ClassVar[str]
    sends: str = "state"
    codec: str | None = None  # None: --update-codec or the device's profile decides
    stateful: ClassVar[bool] = False  # keeps server state between rounds (checkpointed)

    @abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        """The next global tensors from the current ones and (tensors, num_samples) updates,
        sorted by device id by the caller so float sums are reproducible."""

    def __call__(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        return self.aggregate(global_state, updates)

    # -- what the task asks of devices -----------------------------------------------
    def configure_train(self, train: Mapping[str, Any]) -> dict[str, Any]:
        """The task's `train` settings, with whatever this strategy needs devices to apply."""
        return dict(train)

    def task_codec(self, requested: str | None) -> str | None:
        """The uplink codec a round's task names: this strategy's own, else the run's
        --update-codec (None: each device's profile). A codec whose updates mean something
        other than a state (mask1, sign1) only goes with the strategy that reads it."""
        if self.codec is not None:
            if requested is not None and requested != self.codec:
                raise ConfigError(f"strategy {self.name} needs update codec {self.codec!r}, not {requested!r}")
            return self.codec
        if requested in UPDATE_CARRIES:
            raise ConfigError(f"update codec {requested!r} sends a {UPDATE_CARRIES[requested]}, which strategy "
                              f"{self.name} cannot aggregate; use a float codec (fp32, fp16)")
        return requested

    def check_fits(self, model: ModelSpec, state: State) -> None:
        """Refuse, at start, a model whose updates this strategy cannot aggregate (any, by default)."""
        return None

    # -- server state ----------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """Arrays this strategy carries from round to round (empty: stateless). The hub saves
        them with every checkpoint so a resumed run aggregates as an uninterrupted one."""
        return {}

    def load_server_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what `server_state` returned after the round being resumed from."""
        if arrays:
            raise ConfigError(f"strategy {self.name} keeps no server state, but the checkpoint holds "
                              f"{', '.join(sorted(arrays)[:3])}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ServerOptimizer(Strategy):
    """A wrapper: the inner rule proposes the next global g', and g' - g is the round's
    pseudo-gradient (Reddi et al. 2020), which a server optimiser with state (momentum,
    Adam moments) follows instead of jumping to g'. Any inner rule composes: FedAvgM over
    the median is robust aggregation with server momentum. What devices send, the codec and
    the task settings are the inner rule's."""

    stateful = True

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.slots: dict[str, dict[str, np.ndarray]] = {}  # slot name -> tensor name -> float64 buffer

    @property  # type: ignore[override]
    def sends(self) -> str:  # noqa: D102
        return self.inner.sends

    @property  # type: ignore[override]
    def codec(self) -> str | None:  # noqa: D102
        return self.inner.codec

    def configure_train(self, train: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.configure_train(train)

    def check_fits(self, model: ModelSpec, state: State) -> None:
        self.inner.check_fits(model, state)

    @abstractmethod
    def step(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The float64 change to apply to the global for this pseudo-gradient; updates slots."""

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        target = self.inner.aggregate(global_state, updates)
        now = {k: np.asarray(v, np.float64) for k, v in global_state.items()}
        change = self.step({k: np.asarray(target[k], np.float64) - now[k] for k in now})
        return OrderedDict((k, (now[k] + change[k]).astype(np.float32)) for k in now)

    def server_state(self) -> dict[str, np.ndarray]:
        return {f"{slot}/{k}": v for slot, tensors in self.slots.items() for k, v in tensors.items()}

    def load_server_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        slots: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            slot, _, tensor = key.partition("/")
            if not tensor:
                raise ConfigError(f"strategy {self.name}: server state entry {key!r} is not 'slot/tensor'")
            slots.setdefault(slot, {})[tensor] = np.array(value, dtype=np.float64)
        self.slots = slots
