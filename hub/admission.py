"""Whether a well-formed answer (an update, or a report) may enter the open round: the hub's
checks after the envelope, in the order docs/protocol.md §8 lists them. One function for both
envelope kinds, so the order lives in one place."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fedge.models.wire.messages import ReportMessage, TaskMessage, UpdateMessage

from .roster import Roster
from .strategies import ONE_BIT_CODECS
from .task_kinds import TASK_KINDS

# every rejection's code, and what it means (docs/operations.md lists them from here)
REASON_CODES = {
    "not_enrolled": "the hub has keys and no key for this device",
    "bad_envelope": "the message does not decode, verify, parse or fit the model (EnvelopeError)",
    "wrong_topic": "sent on another device's topic, or not on a device update topic",
    "other_run": "belongs to another fleet or run",
    "late": "its round has closed",
    "round_not_open": "names a round that is not open",
    "not_selected": "its device was not selected for the round",
    "wrong_kind": "an update for a report round, or the other way round",
    "wrong_version": "built on another model version than the round's",
    "sample_bound": "claims more samples than its device announced or max_samples allows",
    "wrong_codec": "a 1-bit strategy's round answered in another codec",
    "error": "an unexpected error while checking it (a bug: the text names it)",
    "duplicate": "not a rejection: a resend of an answer already counted, ignored (never stored or counted)",
}


class Reason(str):
    """A rejection's text, which names the specifics, plus a short stable `code` for counting
    rejections by kind (the `reason` label of fedge_updates_rejected_total, docs/operations.md)."""

    code: str

    def __new__(cls, code: str, text: str) -> Reason:
        if code not in REASON_CODES:
            raise ValueError(f"rejection code {code!r} is not in REASON_CODES")
        obj = super().__new__(cls, text)
        obj.code = code
        return obj


DUPLICATE = Reason("duplicate", "duplicate")  # a re-sent update already counted: benign under QoS 1, not a rejection


def admission_reason(
    upd: UpdateMessage | ReportMessage, device: str | None, *, fleet: str, run_id: str, strategy: str, task: TaskMessage | None,
    closed_rounds: Mapping[int, Collection[str]], accepted: Collection[str], roster: Roster,
) -> Reason | None:
    """Why this update or report may not enter the open round (DUPLICATE for a benign resend), or None."""
    if device is None:
        return Reason("wrong_topic", "not sent on a device update topic")
    if upd.device != device:
        return Reason("wrong_topic", f"header says device {upd.device!r} but it was published on {device!r}'s topic")
    if upd.fleet != fleet or upd.run != run_id:
        return Reason("other_run", f"belongs to fleet {upd.fleet!r} run {upd.run!r}, not this run")
    if upd.round in closed_rounds:
        if device in closed_rounds[upd.round]:
            return DUPLICATE
        return Reason("late", f"late or replayed: round {upd.round} is already closed")
    if task is None or upd.round != task.round:
        return Reason("round_not_open", f"round {upd.round} is not open (open round: {task.round if task else 'none'})")
    if device not in task.selected:
        return Reason("not_selected", f"device was not selected for round {upd.round}")
    sent = "report" if isinstance(upd, ReportMessage) else "update"
    expected = TASK_KINDS[task.kind].answer if task.kind in TASK_KINDS else "update"
    if sent != expected:
        return Reason("wrong_kind", f"round {task.round} is {_a(task.kind)} round: it takes {_a(expected)}, not {_a(sent)}")
    if isinstance(upd, ReportMessage) and upd.task_kind != task.kind:
        return Reason("wrong_kind", f"report answers {_a(upd.task_kind)} task, but round {task.round} is {_a(task.kind)} round")
    if upd.base_version != task.model_version:
        verb = "evaluated" if task.kind == "evaluate" else "trained on" if sent == "update" else "used"
        return Reason("wrong_version", f"{verb} model version {upd.base_version}, the round uses {task.model_version}")
    bound = roster.sample_bound(device, upd.num_samples)
    if bound:
        return Reason("sample_bound", bound)
    if isinstance(upd, UpdateMessage) and task.codec in ONE_BIT_CODECS and upd.codec != task.codec:
        return Reason("wrong_codec", f"update uses codec {upd.codec!r}; strategy {strategy} needs {task.codec!r}")
    if device in accepted:
        return DUPLICATE
    return None


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
