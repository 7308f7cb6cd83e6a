"""Run plans: a run is a list of stages, each some rounds of one task kind (e.g. 20 rounds of
`train`, then 1 of `evaluate`). Where a run stands is derived from its completed rounds,
each of which records its stage, so a resumed hub continues at the right stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedge.models.errors import ConfigError

from .task_kinds import TASK_KINDS


@dataclass(frozen=True)
class Stage:
    kind: str  # a task kind (task_kinds.TASK_KINDS)
    rounds: int  # the stage's round budget (a train stage's stop rules may end it sooner)
    # the kind's parameters, sent in each task's `params`; a train stage's override the run's `train`
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, entry: Any, index: int) -> Stage:
        """A stage from the config's `plan` list; ConfigError naming the stage if it is bad."""
        where = f"plan stage {index + 1}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be an object like {{'kind': 'train', 'rounds': 10}}, got {entry!r}")
        kind, rounds, params = entry.get("kind"), entry.get("rounds"), entry.get("params", {})
        if kind not in TASK_KINDS:
            raise ConfigError(f"{where}: task kind {kind!r} is not one the hub runs ({', '.join(TASK_KINDS)})")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"{where}: rounds must be a positive integer, got {rounds!r}")
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: params must be an object, got {params!r}")
        unknown = set(entry) - {"kind", "rounds", "params"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; a stage has kind, rounds, params")
        return cls(kind, rounds, dict(params))


def parse_plan(text: str) -> list[dict[str, Any]]:
    """`train:20,evaluate:1` (the --plan flag) -> the config's plan list."""
    plan: list[dict[str, Any]] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        kind, sep, rounds = part.partition(":")
        if not sep or not rounds.strip().isdigit():
            raise ConfigError(f"--plan {text!r}: stage {i + 1} {part!r} is not KIND:ROUNDS, e.g. train:20,evaluate:1")
        plan.append({"kind": kind.strip(), "rounds": int(rounds)})
    for i, entry in enumerate(plan):
        Stage.from_json(entry, i)
    return plan


def stages_of(plan: Sequence[Any], rounds: int) -> list[Stage]:
    """The run's stages: its plan, or (no plan) one train stage of `rounds` rounds, as always."""
    if not plan:
        return [Stage("train", rounds)]
    return [Stage.from_json(entry, i) for i, entry in enumerate(plan)]
