"""Whether a well-formed answer (an update, or a report) may enter the open round: the hub's
checks after the envelope, in the order docs/protocol.md §8 lists them. One function for both
envelope kinds, so the order lives in one place."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fedge.models.wire.messages import ReportMessage, TaskMessage, UpdateMessage

from .roster import Roster
from .strategies import ONE_BIT_CODECS
from .task_kinds import TASK_KINDS

DUPLICATE = "duplicate"  # a re-sent update already counted: benign under QoS 1, not a rejection


def admission_reason(
    upd: UpdateMessage | ReportMessage, device: str | None, *, fleet: str, run_id: str, strategy: str, task: TaskMessage | None,
    closed_rounds: Mapping[int, Collection[str]], accepted: Collection[str], roster: Roster,
) -> str | None:
    """Why this update or report may not enter the open round (DUPLICATE for a benign resend), or None."""
    if device is None:
        return "not sent on a device update topic"
    if upd.device != device:
        return f"header says device {upd.device!r} but it was published on {device!r}'s topic"
    if upd.fleet != fleet or upd.run != run_id:
        return f"belongs to fleet {upd.fleet!r} run {upd.run!r}, not this run"
    if upd.round in closed_rounds:
        if device in closed_rounds[upd.round]:
            return DUPLICATE
        return f"late or replayed: round {upd.round} is already closed"
    if task is None or upd.round != task.round:
        return f"round {upd.round} is not open (open round: {task.round if task else 'none'})"
    if device not in task.selected:
        return f"device was not selected for round {upd.round}"
    sent = "report" if isinstance(upd, ReportMessage) else "update"
    expected = TASK_KINDS[task.kind].answer if task.kind in TASK_KINDS else "update"
    if sent != expected:
        return f"round {task.round} is {_a(task.kind)} round: it takes {_a(expected)}, not {_a(sent)}"
    if isinstance(upd, ReportMessage) and upd.task_kind != task.kind:
        return f"report answers {_a(upd.task_kind)} task, but round {task.round} is {_a(task.kind)} round"
    if upd.base_version != task.model_version:
        verb = "evaluated" if task.kind == "evaluate" else "trained on" if sent == "update" else "used"
        return f"{verb} model version {upd.base_version}, the round uses {task.model_version}"
    bound = roster.sample_bound(device, upd.num_samples)
    if bound:
        return bound
    if isinstance(upd, UpdateMessage) and task.codec in ONE_BIT_CODECS and upd.codec != task.codec:
        return f"update uses codec {upd.codec!r}; strategy {strategy} needs {task.codec!r}"
    if device in accepted:
        return DUPLICATE
    return None


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
