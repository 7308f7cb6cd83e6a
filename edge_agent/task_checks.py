"""What a device refuses from above: round settings outside its profile's limits, models with
non-finite weights or built for other inputs than its data, training that runs past its time
budget, and bad `evaluate` parameters.

A signature proves a task came from the hub, not that it is sane: a buggy or compromised hub
can still ask for lr NaN, epochs -1 (an unchanged model sent back with full weight) or
epochs 10^6 (days of training). These rules are the one place the agent checks; each
refusal names the bad setting and the limit, and the agent logs it and reports it in its
status message so the operator sees it on the hub.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.models.errors import ConfigError
from fedge.models.wire.sign_quant import QUANTISERS

from .profile import Profile

OPTIMIZERS = ("sgd", "adam")


class Refused(ConfigError):
    """A round this device will not train (or stopped training); the message says why."""


def _number(train: Mapping[str, Any], key: str) -> float | None:
    """The finite number under `key`, None if absent; Refused if it is not one."""
    if key not in train:
        return None
    value = train[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Refused(f"task setting {key!r} must be a finite number, got {value!r}")
    return float(value)


def _integer(train: Mapping[str, Any], key: str) -> int | None:
    if key not in train:
        return None
    value = train[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(f"task setting {key!r} must be an integer, got {value!r}")
    return value


def check_train_settings(train: Mapping[str, Any], profile: Profile, num_samples: int,
                         seconds_per_sample: float | None = None) -> None:
    """Refuse round settings this device must not run. A batch above the profile's
    batch_size is not refused but capped (TrainConfig.resolve), as it always was.

    `seconds_per_sample` (one sample, one epoch, measured on an earlier round) lets a task
    whose training would clearly overrun max_train_seconds be refused before it starts."""
    if not isinstance(train, Mapping):
        raise Refused(f"task settings must be an object, got {type(train).__name__}")
    epochs = _integer(train, "epochs")
    if epochs is not None and not 1 <= epochs <= profile.max_epochs:
        raise Refused(f"task setting 'epochs' is {epochs}; this device allows 1..{profile.max_epochs} "
                      f"(profile {profile.name!r} max_epochs)")
    batch = _integer(train, "batch_size")
    if batch is not None and batch < 1:
        raise Refused(f"task setting 'batch_size' is {batch}; it must be a positive integer")
    lr = _number(train, "lr")
    if lr is not None and lr <= 0:
        raise Refused(f"task setting 'lr' is {lr!r}; it must be positive")
    momentum = _number(train, "momentum")
    if momentum is not None and not 0 <= momentum < 1:
        raise Refused(f"task setting 'momentum' is {momentum!r}; it must be in [0, 1)")
    decay = _number(train, "weight_decay")
    if decay is not None and decay < 0:
        raise Refused(f"task setting 'weight_decay' is {decay!r}; it must be >= 0")
    mu = _number(train, "proximal_mu")
    if mu is not None and mu < 0:
        raise Refused(f"task setting 'proximal_mu' is {mu!r}; it must be >= 0 (FedProx)")
    quantiser = train.get("sign_quantiser", "deterministic")
    if quantiser not in QUANTISERS:
        raise Refused(f"task setting 'sign_quantiser' is {quantiser!r}; allowed: {', '.join(QUANTISERS)}")
    if not isinstance(train.get("error_feedback", False), bool):
        raise Refused(f"task setting 'error_feedback' must be true or false, got {train['error_feedback']!r}")
    optimizer = train.get("optimizer", profile.optimizer)
    if optimizer not in OPTIMIZERS:
        raise Refused(f"task setting 'optimizer' is {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if seconds_per_sample is not None:
        runs = epochs if epochs is not None else profile.local_epochs
        planned = runs * num_samples * seconds_per_sample
        if planned > profile.max_train_seconds:
            raise Refused(f"task asks for {runs} epoch(s) over {num_samples} samples: about {planned:.0f} s at "
                          f"this device's measured speed, above max_train_seconds={profile.max_train_seconds:g}")


def check_evaluate_params(params: Mapping[str, Any]) -> int:
    """The batch size of an `evaluate` task (params.batch_size, default 256): memory only, so
    any positive integer up to 65536 is fine."""
    if not isinstance(params, Mapping):
        raise Refused(f"task params must be an object, got {type(params).__name__}")
    batch = _integer(params, "batch_size")
    if batch is not None and not 1 <= batch <= 65536:
        raise Refused(f"task param 'batch_size' is {batch}; evaluate allows 1..65536")
    return batch or 256


def check_model(tensors: Mapping[str, np.ndarray], version: int) -> None:
    """Refuse a model with NaN or Inf weights: training from it yields garbage (or NaN loss)
    that would be sent back with this device's full weight."""
    for name, tensor in tensors.items():
        finite = np.isfinite(tensor)
        if not finite.all():
            nan = int(np.isnan(tensor).sum())
            raise Refused(f"model version {version} has non-finite weights: tensor {name!r} holds "
                          f"{nan} NaN and {int(finite.size - finite.sum()) - nan} Inf value(s)")


def check_input(meta: Mapping[str, Any], in_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse a model built for other inputs or labels than this device's data: its `meta`
    names the input shape [C, H, W] (any channel count, e.g. 6 for a pair of RGB images) and
    the class count the hub built it for. Without this, another shape (e.g. an [N, H, W, C]
    file where fedge wants [N, C, H, W]) or class count fails inside training, every round,
    with a size-mismatch error that names neither. Absent entries (older hubs) are not checked."""
    shape = meta.get("in_shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise Refused(f"model meta 'in_shape' must be a list of whole numbers, got {shape!r}")
        if tuple(shape) != tuple(in_shape):
            hint = "; the fleet's data and the hub's --in-shape/--dataset must agree"
            if len(shape) == 3 and tuple(in_shape) == (shape[1], shape[2], shape[0]):
                hint = "; the data is channels-last: store x as [N, C, H, W], e.g. x.transpose(0, 3, 1, 2)"
            raise Refused(f"the model takes inputs {list(shape)}, this device's data is {list(in_shape)} "
                          f"(channels, height, width){hint}")
    classes = meta.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise Refused(f"model meta 'num_classes' must be a positive integer, got {classes!r}")
    if classes is not None and classes != num_classes:
        raise Refused(f"the model has {classes} classes, this device's task has {num_classes} "
                      f"(fedge agent --num-classes {classes})")


@dataclass(frozen=True)
class TimeBudget:
    """A per-step check for the trainer: Refused once training has run past max_train_seconds.
    Plain data (not a closure) so a request carrying it runs in a worker process too."""

    limit: float
    profile: str

    def __call__(self, elapsed: float) -> None:
        if elapsed > self.limit:
            raise Refused(f"training stopped after {elapsed:.1f} s: above max_train_seconds={self.limit:g} "
                          f"(profile {self.profile!r})")


def time_budget(profile: Profile) -> TimeBudget:
    """The profile's training time budget (max_train_seconds)."""
    return TimeBudget(float(profile.max_train_seconds), profile.name)
