"""What a model is: a `ModelSpec`, a registered name plus that model's options (e.g. the prune
ratio of an MPT model, the width of an MLP), never a string to be parsed back.

Torch-free, so the wire format (models/wire/messages.py) carries a spec and a torch-less device
reads it. Which options a model takes, their types, defaults and ranges are declared with its
registration (models/registry.py, `Option`); `registry.model_spec` checks a spec against them
and drops the options left at their defaults, so two specs of the same model are equal exactly
when they build the same model. Text is turned into a spec once, where it enters: the command
line (fedge/cli/common.py), profile files (edge_agent/profile.py), stored run configs
(hub/config.py) and message headers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

OptionValue = int | float | str
_KINDS: dict[type, str] = {int: "an integer", float: "a number", str: "a string"}


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Option:
    """One option a registered model takes. `low`/`high` bound a number (inclusive; `high_open`
    makes the upper bound exclusive, as for a prune ratio < 1); `choices` lists a string's values."""

    name: str
    kind: type  # int, float or str
    default: OptionValue
    help: str = ""
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """The allowed values in words, e.g. 'a number in [0, 1)'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = _KINDS[self.kind]
        if self.low is not None and self.high is not None:
            return f"{what} in [{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} >= {_fmt(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return what

    def describe(self) -> str:
        """'prune_ratio (a number in [0, 1), default 0.8)': for error messages and --help."""
        return f"{self.name} ({self.allowed()}, default {self.default})"

    def check(self, model: str, value: object) -> OptionValue:
        """`value` as this option's type, or a ConfigError naming the model, the option and what
        it allows. An integer is a fine number; a bool, a string for a number or NaN is not."""
        bad = ConfigError(f"model {model}: option {self.name}={value!r} is not {self.allowed()}")
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.low is not None and value < self.low:
            raise bad
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise bad
        return value

    def to_json(self) -> dict[str, Any]:
        """The declaration as JSON (help left out), for a torch-free reader that cannot import the
        registry: a graph template (models/onnx_graph.py) stores its model's options so."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.__name__, "default": self.default}
        out.update({k: v for k, v in (("low", self.low), ("high", self.high)) if v is not None})
        if self.high_open:
            out["high_open"] = True
        if self.choices:
            out["choices"] = list(self.choices)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Option:
        """to_json's form back; a ConfigError when it is not one."""
        kinds = {k.__name__: k for k in _KINDS}
        try:
            kind = kinds[data["kind"]]
            return cls(str(data["name"]), kind, data["default"], low=data.get("low"), high=data.get("high"),
                       high_open=bool(data.get("high_open", False)), choices=tuple(data.get("choices", ())))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a model option declaration: {dict(data)!r} ({type(exc).__name__}: {exc})") from None

    def parse(self, model: str, text: str) -> OptionValue:
        """The value of command-line text (`--model-option prune_ratio=0.9`), checked."""
        if self.kind is str:
            return self.check(model, text)
        try:
            value: OptionValue = int(text) if self.kind is int else float(text)
        except ValueError:
            raise ConfigError(f"model {model}: option {self.name}={text!r} is not {self.allowed()}") from None
        return self.check(model, value)


def takes_text(options: Iterable[Option]) -> str:
    """'its options: prune_ratio (a number in [0, 1), default 0.8); ...' or 'it takes no options'."""
    options = tuple(options)
    return f"its options: {'; '.join(o.describe() for o in options)}" if options else "it takes no options"


def unknown_option(model: str, key: str, options: Iterable[Option]) -> ConfigError:
    """The error for option `key`, which model `model` (declaring `options`) does not have: the
    same text from the registry and from a torch-free device filling a graph template."""
    return ConfigError(f"model {model} has no option {key!r}; {takes_text(options)}")


def split_option_text(text: str) -> tuple[str, str]:
    """'prune_ratio=0.9' -> ('prune_ratio', '0.9'); a ConfigError for text without '='."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"model option {text!r}: expected NAME=VALUE, e.g. prune_ratio=0.9")
    return key.strip(), value.strip()


@dataclass(frozen=True, init=False)
class ModelSpec:
    """A model: its registered `name` and its `options` (sorted (name, value) pairs, hashable,
    so a spec can key a cache). `ModelSpec("conv4-mpt", {"prune_ratio": 0.9})` builds one; only
    registry.model_spec checks it against the registration (it does so wherever one enters)."""

    name: str
    options: tuple[tuple[str, OptionValue], ...]

    def __init__(self, name: str, options: Mapping[str, OptionValue] | Iterable[tuple[str, OptionValue]] = ()) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a model is a registered model name, got {name!r}")
        pairs = dict(options.items() if isinstance(options, Mapping) else options)
        for key in pairs:
            if not isinstance(key, str):
                raise ConfigError(f"model {name}: option names are strings, got {key!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(pairs.items())))

    def option(self, key: str, default: OptionValue | None = None) -> OptionValue | None:
        """The value of option `key` if this spec sets it, else `default`."""
        return dict(self.options).get(key, default)

    def options_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def to_json(self) -> dict[str, Any]:
        """{"name": ..., "options": {...}}: how run configs and run.json record a model."""
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_json(cls, data: object) -> ModelSpec:
        """A spec from to_json's form, or from a plain registered name (configs stored before
        specs); the registry checks it where it is used."""
        if isinstance(data, str):
            return cls(data)
        if isinstance(data, Mapping) and isinstance(data.get("name"), str) and isinstance(data.get("options", {}), Mapping):
            return cls(data["name"], data.get("options", {}))
        raise ConfigError(f"a model is {{'name': ..., 'options': {{...}}}} or a registered name, got {data!r}")

    def __str__(self) -> str:
        """For people (logs, plot titles): 'conv4-mpt(prune_ratio=0.9)'. Never parsed back."""
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.options)})"
