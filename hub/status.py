"""The hub's status as one JSON-ready dict: what the status page shows and /metrics exports.

Built from the live state the hub copies under its round lock (LiveState) and the run store,
so readers (the HTTP server's threads) never touch the hub's internals while the round loop
changes them. Pure: no HTTP here (hub/status_server.py serves it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from fedge.models.registry import model_family
from fedge.models.wire.messages import TaskMessage

from .config import HubConfig
from .rounds import plan_position
from .store import RunStore

# what the round loop is doing: Hub._phase takes these values
PHASES = ("starting", "waiting for devices", "collecting", "closing round", "finished", "stopped")
RECENT_REJECTIONS = 10  # rejections the page lists (the store keeps all of them)


@dataclass
class LiveState:
    """The hub's in-memory state at one instant (copied under its round lock)."""

    phase: str
    task: TaskMessage | None  # the open round's task; None between rounds
    answered: list[str]  # devices whose answer the open round has accepted
    devices: list[dict[str, Any]]  # Roster.devices()
    accepted_answers: int  # since this hub process started
    rejected_by: dict[str, int] = field(default_factory=dict)  # rejection code -> count, since this hub started
    # selected devices that said they will not answer the open attempt: device -> (refused|failed, reason)
    declined: dict[str, tuple[str, str]] = field(default_factory=dict)


def headline_value(record: dict[str, Any], headline: str) -> float | None:
    """A round record's headline metric (the family's: accuracy, f1, ...), None if not evaluated."""
    metrics = record.get("metrics")
    value = metrics.get(headline) if isinstance(metrics, dict) else record.get(headline)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _round_row(record: dict[str, Any], headline: str) -> dict[str, Any]:
    return {"round": record["round"], "kind": record.get("kind") or "train", "model_version": record.get("model_version"),
            "stage": int(record.get("stage") or 0),
            "headline": headline_value(record, headline), "loss": record.get("loss"),
            "metrics": record.get("metrics") or {}, "participants": len(record.get("participants") or []),
            "selected": len(record.get("selected") or []), "bytes_up": int(record["bytes_up"]),
            "bytes_down": int(record["bytes_down"]), "seconds": float(record["seconds"]),
            "completed_at": record.get("completed_at")}


def _open_round(task: TaskMessage, live: LiveState, quorum: float, now: float) -> dict[str, Any]:
    return {"round": task.round, "kind": task.kind, "model_version": task.model_version, "deadline": task.deadline,
            "seconds_left": max(0.0, task.deadline - now), "selected": list(task.selected),
            "answered": list(live.answered),
            "declined": {d: {"kind": kind, "reason": reason} for d, (kind, reason) in sorted(live.declined.items())},
            "needed": max(1, math.ceil(quorum * len(task.selected)))}


def status_dict(config: HubConfig, run_id: str, live: LiveState, store: RunStore) -> dict[str, Any]:
    """The status document (docs/operations.md, "Status page"): run, stage, open round, devices,
    per-round history, rejections. Times are Unix seconds; `now` is the hub's clock, so a
    page can count down the deadline without trusting its own clock."""
    now = time.time()
    history = store.rounds()
    headline = model_family(config.model).headline
    stages = config.stages()
    stage_index, stage_done = plan_position(config, stages, history)
    task = live.task
    selected = set(task.selected) if task else set()
    devices = [{**d, "selected": d["id"] in selected, "answered": d["id"] in live.answered,
                "declined": live.declined[d["id"]][0] if d["id"] in live.declined else None} for d in live.devices]
    rows = [_round_row(r, headline) for r in history]
    last_value = next((r["headline"] for r in reversed(rows) if r["headline"] is not None), None)
    return {
        "now": now,
        "run": {"id": run_id, "fleet": config.fleet, "model": config.model.name,
                "model_options": config.model.options_dict(), "strategy": config.strategy,
                "headline": headline, "status": store.get_meta("status"), "phase": live.phase},
        "stage": {"index": stage_index, "count": len(stages), "rounds_done": stage_done,
                  "kind": stages[stage_index].kind if stage_index < len(stages) else None,
                  "rounds": stages[stage_index].rounds if stage_index < len(stages) else None},
        "stages": [{"kind": s.kind, "rounds": s.rounds} for s in stages],
        "round": _open_round(task, live, config.quorum, now) if task else None,
        "rounds_completed": len(rows),
        "total_rounds": config.total_rounds(),
        "last_headline": last_value,
        "devices": devices,
        "devices_online": sum(1 for d in devices if d["online"]),
        "history": rows,
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "answers_accepted": live.accepted_answers,
        "rejections": {"total": store.rejection_count(), "by_reason": dict(live.rejected_by),
                       "recent": store.rejections(last=RECENT_REJECTIONS)},
    }
