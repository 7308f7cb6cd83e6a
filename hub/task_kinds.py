"""The task kinds a hub can put in a run plan: what devices answer each with (an `update` with
tensors, or a `report` with numbers only), and for report kinds how a round's reports become
its record. One entry per kind (TASK_KINDS); the device side's handlers are in
edge_agent/tasks.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Reports = Mapping[str, tuple[int, Mapping[str, Any]]]  # device -> (num_samples, metrics) of its report


@dataclass(frozen=True)
class TaskKind:
    answer: str  # the envelope kind devices answer with: "update" (tensors, aggregated) or "report"
    summarize: Callable[[Reports], dict[str, Any]] | None = None  # report kinds: the round record's fields


def weighted_mean(reports: Reports, metric: str) -> float | None:
    """The sample-weighted mean of `metric` over the reports that carry it; None if none do."""
    pairs = [(n, float(m[metric])) for n, m in reports.values() if isinstance(m.get(metric), (int, float))]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def summarize_evaluation(reports: Reports) -> dict[str, Any]:
    """An evaluate round's record: each device's loss and accuracy on its own data (and how
    many examples), and their means weighted by those counts."""
    return {
        "device_metrics": {d: {"num_samples": n, **dict(m)} for d, (n, m) in sorted(reports.items())},
        "device_accuracy": weighted_mean(reports, "accuracy"),
        "device_loss": weighted_mean(reports, "loss"),
    }


TASK_KINDS: dict[str, TaskKind] = {
    "train": TaskKind(answer="update"),
    "evaluate": TaskKind(answer="report", summarize=summarize_evaluation),
}
