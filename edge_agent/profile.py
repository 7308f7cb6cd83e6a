"""Firmware profiles: what a class of device may do (model, mode, batch, threads, memory) and
the most a round task may ask of it (epochs, training time).

The schema lives here and nowhere else; the hub reads the same fields from a device's
status message. Every error names the file, the key and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedge import firmware_profiles
from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec

PROFILE_DIR = Path(firmware_profiles.__file__).resolve().parent


class ProfileError(ConfigError):
    """A profile file that is missing, unparsable or breaks the schema."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    device: str = "cpu"  # cpu | cuda
    threads: int = 1  # torch intra-op threads while training
    batch_size: int = 32  # upper bound: a round task may ask for less, never more
    memory_budget_mb: int = 512  # training refuses to start above this estimate
    model: ModelSpec = ModelSpec("mlp")  # YAML: `model` (a registered name) and `model_options` (a mapping)
    mode: str = "dense"  # dense | mpt
    local_epochs: int = 1
    precision: str = "fp32"  # wire codec of uploaded updates: fp32 | fp16
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    # Limits on what the hub may ask (edge_agent/task_checks.py): a task above them is refused.
    max_epochs: int = 20  # local epochs a round task may ask for
    max_train_seconds: float = 3600.0  # wall-clock budget of one round's training; stopped beyond it

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # a plain registered name (e.g. dataclasses.replace(p, model="mlp"))
            object.__setattr__(self, "model", ModelSpec(self.model))

    def summary(self) -> dict[str, Any]:
        """What the device announces to the hub in its status message (the model as its name and options)."""
        return {**asdict(self), "model": self.model.name, "model_options": self.model.options_dict()}


# key -> (python types, allowed values or None, human description)
_SCHEMA: dict[str, tuple[tuple[type, ...], tuple | None, str]] = {
    "name": ((str,), None, "a short profile name"),
    "description": ((str,), None, "free text"),
    "device": ((str,), ("cpu", "cuda"), "where training runs"),
    "threads": ((int,), None, "positive integer"),
    "batch_size": ((int,), None, "positive integer"),
    "memory_budget_mb": ((int,), None, "positive integer (MiB)"),
    "model": ((str,), None, "a registered model name"),
    "model_options": ((dict,), None, "a mapping of the model's options, e.g. {prune_ratio: 0.9}"),
    "mode": ((str,), ("dense", "mpt"), "training mode"),
    "local_epochs": ((int,), None, "positive integer"),
    "precision": ((str,), ("fp32", "fp16"), "update codec"),
    "lr": ((int, float), None, "positive number"),
    "optimizer": ((str,), ("sgd", "adam"), "local optimiser"),
    "momentum": ((int, float), None, "number in [0, 1)"),
    "max_epochs": ((int,), None, "positive integer (most local epochs a round task may ask for)"),
    "max_train_seconds": ((int, float), None, "positive number (seconds one round's training may take)"),
}
_POSITIVE = ("threads", "batch_size", "memory_budget_mb", "local_epochs", "lr", "max_epochs", "max_train_seconds")
# the file's `model` and `model_options` become the Profile's one ModelSpec
assert set(_SCHEMA) - {"model_options"} == {f.name for f in fields(Profile)}, "schema and Profile must list the same keys"


def validate(raw: Any, source: str) -> Profile:
    """Check a parsed mapping against the schema and build a Profile."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping, got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in _SCHEMA:
            raise ProfileError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(sorted(_SCHEMA))}")
        types, allowed, what = _SCHEMA[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProfileError(f"{source}: key {key!r} must be {what}, got {value!r} ({type(value).__name__})")
        if allowed is not None and value not in allowed:
            raise ProfileError(f"{source}: key {key!r} is {value!r}; allowed: {', '.join(allowed)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProfileError(f"{source}: key {key!r} must be a finite number, got {value!r}")
        if key in _POSITIVE and value <= 0:
            raise ProfileError(f"{source}: key {key!r} must be positive, got {value!r}")
        if key == "momentum" and not 0 <= value < 1:
            raise ProfileError(f"{source}: key 'momentum' must be in [0, 1), got {value!r}")
    if "name" not in raw:
        raise ProfileError(f"{source}: missing required key 'name'")
    if raw.get("local_epochs", 1) > raw.get("max_epochs", Profile.max_epochs):
        raise ProfileError(f"{source}: key 'local_epochs' ({raw['local_epochs']}) is above max_epochs "
                           f"({raw.get('max_epochs', Profile.max_epochs)})")
    from fedge.models.registry import model_names, model_spec  # noqa: PLC0415 - torch only when validating

    values = dict(raw)
    name = values.pop("model", "mlp")
    if name not in model_names():
        raise ProfileError(f"{source}: key 'model' is {name!r}; allowed: {', '.join(model_names())}")
    try:
        values["model"] = model_spec(name, values.pop("model_options", None))
    except ConfigError as exc:
        raise ProfileError(f"{source}: key 'model_options': {exc}") from None
    return Profile(**values)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name (e.g. 'rpi4') or the user's own YAML file by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ProfileError(
                f"no profile named {name_or_path!r}; built-in profiles: {', '.join(available_profiles())}, "
                f"or pass the path of a YAML file"
            )
    if not path.exists():
        raise ProfileError(f"profile file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    return validate(raw, str(path))
