"""Task kinds and run plans over a real broker: an agent refuses a kind it does not run (the
reason in its status, the model never fetched); an evaluate round is answered with tensor-free
`report` envelopes whose metrics the hub records; a two-stage plan runs its stages in order;
a hub stopped after stage 1 resumes at stage 2; admission keeps updates and reports apart."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.pool import TrainingPool
from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.tasks import HANDLERS
from fedge.hub.admission import admission_reason
from fedge.hub.config import HubConfig
from fedge.hub.plan import parse_plan
from fedge.hub.roster import Roster
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.task_kinds import weighted_mean
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.wire import EnvelopeError, Topics, decode, encode
from fedge.models.wire.keys import device_key
from fedge.models.wire.messages import (
    ReportMessage,
    TaskMessage,
    UpdateMessage,
    build_report_message,
    build_task_message,
    parse_report,
    parse_task,
)
from fedge.models.wire.transport import BrokerConfig, make_link

from .inbox import Inbox

PLAN = [{"kind": "train", "rounds": 2}, {"kind": "evaluate", "rounds": 1}]


def _fleet(url: str, prefix: str, tmp_path: Path, data, devices: int = 3, **hub_kw) -> Fleet:  # noqa: ANN001
    hub = HubConfig(fleet="kinds", prefix=prefix, model="mlp", train={"lr": 0.05, "batch_size": 32}, **hub_kw)
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


class _Tap:
    """A plain MQTT client on every device's uplink topic: what actually crossed the broker."""

    def __init__(self, url: str, topics: Topics) -> None:
        cfg = BrokerConfig.from_url(url)
        self.payloads: list[bytes] = []
        subscribed = threading.Event()
        # its own client id: an empty one may share a session with other tests' clients on amqtt
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"tap-{topics.base.replace('/', '-')}")
        # only the uplink: amqtt 0.12 hands a connecting client the retained messages of every client's
        # subscriptions (e.g. the hub's status, which the agents read), not only of its own
        uplink = topics.all_device_updates
        self.client.on_message = lambda c, u, m: (self.payloads.append(bytes(m.payload))
                                                  if mqtt.topic_matches_sub(uplink, m.topic) else None)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()
        self.client.subscribe(topics.all_device_updates, qos=1)
        assert subscribed.wait(10), "tap did not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ----------------------------------------------------------------------------- wire
def test_task_kind_defaults_to_train_and_round_trips():
    task = TaskMessage(fleet="f", run="r", round=3, model_version=2, selected=["d"], deadline=1.0, train={},
                       state="open", kind="evaluate", params={"batch_size": 64})
    back = parse_task(decode(build_task_message(task)))
    assert (back.kind, back.params) == ("evaluate", {"batch_size": 64})
    # a task from before task kinds (no task_kind, no params) still means train
    old = {"kind": "task", "fleet": "f", "run": "r", "round": 1, "model_version": 0, "selected": ["d"],
           "deadline": 1.0, "train": {"lr": 0.1}, "state": "open", "update_codec": None, "epoch": 0}
    legacy = parse_task(decode(encode(old)))
    assert (legacy.kind, legacy.params, legacy.train) == ("train", {}, {"lr": 0.1})


def test_report_is_tagged_and_carries_no_tensors():
    key = b"k" * 32
    payload = build_report_message("f", "r", "d", 2, 1, "evaluate", 50, {"accuracy": 0.5, "loss": 1.2}, key=key)
    env = decode(payload, key=key)
    assert env.kind == "report" and env.body == b"" and "tensors" not in env.header
    assert parse_report(env).metrics == {"accuracy": 0.5, "loss": 1.2}
    with pytest.raises(EnvelopeError, match="authentication tag"):
        decode(payload, key=b"x" * 32)
    with pytest.raises(EnvelopeError, match="not authenticated"):
        decode(build_report_message("f", "r", "d", 2, 1, "evaluate", 50, {"accuracy": 0.5}), key=key)
    header = dict(env.header)
    with pytest.raises(EnvelopeError, match="carries no tensors"):
        parse_report(decode(encode(header, b"\x00" * 8)))
    with pytest.raises(EnvelopeError, match="'accuracy' must be a finite number"):
        parse_report(decode(encode({**header, "metrics": {"accuracy": "high"}})))


def test_admission_keeps_updates_and_reports_to_their_rounds():
    """One order for both kinds: an update in an evaluate round and a report in a train round
    are rejected by name; the shared checks (selected, version, duplicate) apply to reports."""
    roster = Roster(1000)
    for device in ("d", "e"):
        roster.update(device, {"state": "online", "device": device, "num_samples": 10})
    evaluate = TaskMessage(fleet="f", run="r", round=3, model_version=2, selected=["d"], deadline=1e12, train={},
                           state="open", kind="evaluate")
    train = TaskMessage(**{**evaluate.__dict__, "kind": "train"})
    report = ReportMessage("f", "r", "d", 3, 2, "evaluate", 10, {"accuracy": 1.0})
    update = UpdateMessage("f", "r", "d", 3, 2, 10, {}, {})  # type: ignore[arg-type]

    def reason(msg, task, device="d", accepted=()):  # noqa: ANN001, ANN202
        return admission_reason(msg, device, fleet="f", run_id="r", strategy="fedavg", task=task, closed_rounds={},
                                accepted=accepted, roster=roster)

    assert reason(report, evaluate) is None
    assert reason(update, evaluate) == "round 3 is an evaluate round: it takes a report, not an update"
    assert reason(report, train) == "round 3 is a train round: it takes an update, not a report"
    assert reason(report, evaluate, device="e") == "header says device 'd' but it was published on 'e''s topic"
    assert reason(ReportMessage("f", "r", "e", 3, 2, "evaluate", 10, {}), evaluate, device="e") == \
        "device was not selected for round 3"
    assert "evaluated model version 1" in reason(ReportMessage("f", "r", "d", 3, 1, "evaluate", 10, {}), evaluate)
    assert reason(report, evaluate, accepted=("d",)) == "duplicate"
    assert weighted_mean({"a": (30, {"accuracy": 1.0}), "b": (10, {"accuracy": 0.0})}, "accuracy") == 0.75


def test_plan_flag_and_config():
    assert parse_plan("train:20, evaluate:1") == [{"kind": "train", "rounds": 20}, {"kind": "evaluate", "rounds": 1}]
    for bad, match in (("train:0", "positive integer"), ("train", "KIND:ROUNDS"), ("score:2", "'score' is not one")):
        with pytest.raises(ConfigError, match=match):
            parse_plan(bad)
    assert [(s.kind, s.rounds) for s in HubConfig(rounds=7).stages()] == [("train", 7)]  # no plan: as always
    cfg = HubConfig(plan=PLAN)
    assert cfg.total_rounds() == 3 and HubConfig.from_json(cfg.to_json()).plan == PLAN
    with pytest.raises(ConfigError, match="plan stage 2"):
        HubConfig(plan=[PLAN[0], {"kind": "evaluate", "rounds": 1, "epochs": 3}]).check()


# ----------------------------------------------------------------------------- agent
def test_agent_refuses_an_unknown_kind_with_the_reason_in_its_status(mosquitto_url, topic_prefix, small_data):
    topics = Topics("kinds", topic_prefix)
    statuses = Inbox()
    hub = make_link(BrokerConfig.from_url(mosquitto_url), client_id=f"fake-hub-{topic_prefix[-12:]}")
    hub.subscribe(topics.all_device_status, statuses)
    hub.start(20)
    pool = TrainingPool(workers=1, threads_per_worker=1)
    agent = Agent("dev000", load_profile("sim"), BrokerConfig.from_url(mosquitto_url), topics, small_data.train,
                  small_data.num_classes, pool=pool, warn_unverified=False)
    task = TaskMessage(fleet="kinds", run="run-x", round=1, model_version=0, selected=["dev000"],
                       deadline=time.time() + 60, train={}, state="open", kind="score", params={"budget": 10})
    try:
        agent.start()
        hub.publish(topics.round, build_task_message(task), qos=1, retain=True).wait_for_publish(5)

        def refused(_topic: str, payload: bytes) -> bool:
            return bool(payload) and "refused" in json.loads(payload)

        assert statuses.wait(refused, timeout=20), statuses.payloads()
        info = json.loads([p for p in statuses.payloads() if p and "refused" in json.loads(p)][-1])
        assert info["refused"]["round"] == 1 and info["refused"]["run"] == "run-x"
        assert info["refused"]["reason"] == f"task kind 'score' is not one this device runs (it runs: {', '.join(HANDLERS)})"
        assert info["task_kinds"] == sorted(HANDLERS)
        assert agent.rounds_trained == 0 and agent.reports_sent == 0
        assert agent.bytes_down == len(build_task_message(task))  # the task only: it never fetched a model
    finally:
        agent.stop()
        hub.publish(topics.round, b"", qos=1, retain=True).wait_for_publish(5)
        hub.stop()
        pool.close()


# ----------------------------------------------------------------------------- hub + fleet
def test_two_stage_plan_trains_then_evaluates_with_reports(broker_url, topic_prefix, tmp_path, small_data):
    """train:2,evaluate:1 over a real broker, with device keys: rounds 1-2 aggregate updates,
    round 3 collects tensor-free reports (as they crossed the broker, each tagged with its
    device's key) and records each device's metrics."""
    keys = str(tmp_path / "keys")
    fleet = _fleet(broker_url, topic_prefix, tmp_path, small_data, plan=PLAN, keys_dir=keys)
    tap = _Tap(broker_url, Topics("kinds", topic_prefix))
    try:
        with fleet:
            hub = fleet.make_hub()
            report = fleet.run(hub)
    finally:
        tap.close()
    rounds = report["rounds"]
    assert [(r["round"], r["kind"], r["stage"]) for r in rounds] == [(1, "train", 0), (2, "train", 0), (3, "evaluate", 1)]
    assert [r["model_version"] for r in rounds] == [1, 2, 2]  # evaluating does not change the model
    assert rounds[1]["accuracy"] > 0.5  # it learned (chance is 0.1)
    # every round also stores the model family's metrics (classification: loss and accuracy)
    assert all(r["metrics"] == {"loss": r["loss"], "accuracy": r["accuracy"]} for r in rounds), rounds
    evaluation = rounds[2]
    devices = ["dev000", "dev001", "dev002"]
    assert evaluation["participants"] == devices and set(evaluation["device_metrics"]) == set(devices)
    metrics = evaluation["device_metrics"]
    assert all(metrics[d]["num_samples"] == len(a.y) for d, a in zip(devices, fleet.agents))
    mean = sum(m["num_samples"] * m["accuracy"] for m in metrics.values()) / sum(m["num_samples"] for m in metrics.values())
    assert evaluation["device_accuracy"] == pytest.approx(mean)
    assert evaluation["device_accuracy"] > 0.5 and evaluation["device_loss"] > 0  # the trained model, on device data
    # this run's answers only: the session's embedded broker has carried other tests' messages
    ours = [p for p in tap.payloads if decode(p).header.get("run") == fleet.run_id]
    envelopes = [decode(p) for p in ours]
    reports = [e for e in envelopes if e.kind == "report"]
    assert len([e for e in envelopes if e.kind == "update"]) == 6
    assert len(reports) == 3 and all(e.body == b"" and "tensors" not in e.header for e in reports)
    assert {e.header["round"] for e in reports} == {3}
    for payload in ours:  # tagged like every update: it verifies with its device's key only
        env = decode(payload)
        assert env.tag is not None
        decode(payload, key=device_key(keys, env.header["device"]))
    assert evaluation["bytes_up"] < 2000  # three small JSON headers, no model
    assert all(a.reports_sent == 1 and a.rounds_trained == 2 for a in fleet.agents)
    assert hub.store.rejections() == []


def test_hub_stopped_after_stage_1_resumes_at_stage_2(embedded_broker, topic_prefix, tmp_path, small_data):
    fleet = _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=2, plan=PLAN)
    fleet.cfg.stop_after = 2  # the first hub stops once stage 1 (train:2) is done
    with fleet:
        first = fleet.make_hub()
        first_rounds = fleet.run(first)["rounds"]
        assert [r["kind"] for r in first_rounds] == ["train", "train"]
        assert first.store.get_meta("status") == "running"
        fleet.cfg.stop_after = None
        fleet.cfg.hub.plan = []  # the resumed hub reads its plan from the run store, not from here
        second = fleet.make_hub(resume=True)
        assert second.config.plan == PLAN and second.version == 2
        report = fleet.run(second)
    rounds = report["rounds"]
    assert [(r["round"], r["kind"], r["stage"]) for r in rounds] == [(1, "train", 0), (2, "train", 0), (3, "evaluate", 1)]
    assert [r["model_version"] for r in rounds] == [1, 2, 2]
    assert all(a.rounds_trained == 2 and a.reports_sent == 1 for a in fleet.agents)  # stage 1 was not run again
    assert second.store.get_meta("status") == "finished"
    assert rounds[2]["device_accuracy"] > 0.5


def test_design_doc_shows_the_real_code():
    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "design.md").read_text().split("## Task kinds and run plans", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    sources = "".join((root / f).read_text() for f in ("edge_agent/tasks.py", "hub/task_kinds.py"))
    assert len(blocks) == 4
    for block in blocks:
        assert block in sources, block[:80]


def test_fleet_command_runs_a_plan(tmp_path):
    """`fedge fleet --plan train:2,evaluate:1` as users run it: run.json and the printed summary
    carry the devices' evaluation; --plan with --rounds is refused, naming both."""
    import subprocess
    import sys

    fedge = [sys.executable, "-m", "fedge.cli", "fleet", "--transport", "inproc", "--dataset", "synthetic",
             "--partition", "iid", "--devices", "2", "--runs-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(fedge + ["--plan", "train:2,evaluate:1", "--run-id", "plan"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.loads((tmp_path / "plan" / "run.json").read_text())
    assert [r["kind"] for r in run["rounds"]] == ["train", "train", "evaluate"]
    assert run["config"]["hub"]["plan"] == [{"kind": "train", "rounds": 2}, {"kind": "evaluate", "rounds": 1}]
    assert run["device_accuracy"] == run["rounds"][2]["device_accuracy"] > 0.4  # chance is 0.1
    printed = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert printed["device_accuracy"] == run["device_accuracy"]
    bad = subprocess.run(fedge + ["--plan", "train:2", "--rounds", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give --rounds or --plan, not both" in bad.stderr


def test_a_train_stage_params_override_the_run_settings(tmp_path):
    """A second train stage with its own lr: its tasks carry it, the first stage's the run's."""
    from fedge.hub.hub import Hub
    from fedge.hub.store import RunStore
    from fedge.models.wire.inproc import InprocBroker

    plan = [{"kind": "train", "rounds": 1}, {"kind": "train", "rounds": 1, "params": {"lr": 0.01}},
            {"kind": "evaluate", "rounds": 1, "params": {"batch_size": 64}}]
    cfg = HubConfig(fleet="kinds", model="mlp", train={"lr": 0.05, "epochs": 1}, plan=plan)
    hub = Hub(cfg, InprocBroker().link, RunStore(tmp_path / "run"))
    hub._roster.update("dev000", {"state": "online", "num_samples": 10})  # noqa: SLF001 - one device online
    stages = cfg.stages()
    first, second, third = (hub._open(r, 0, stages[r - 1], 1) for r in (1, 2, 3))  # noqa: SLF001
    assert (first.kind, first.train, first.params) == ("train", {"lr": 0.05, "epochs": 1}, {})
    assert (second.kind, second.train, second.params) == ("train", {"lr": 0.01, "epochs": 1}, {})
    assert (third.kind, third.train, third.params) == ("evaluate", {}, {"batch_size": 64})


def test_a_run_store_from_before_plans_gains_the_columns_and_reads_as_stage_0(tmp_path):
    """An old run.sqlite (no kind/stage columns) opens, its rounds read as the one train stage,
    and a resumed hub continues that stage, as before plans."""
    import sqlite3

    from fedge.hub.rounds import plan_position
    from fedge.hub.store import RunStore

    (tmp_path / "old").mkdir()
    db = sqlite3.connect(tmp_path / "old" / "run.sqlite")
    db.execute("CREATE TABLE rounds (round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, accuracy REAL, "
               "loss REAL, participants TEXT NOT NULL, selected TEXT NOT NULL, bytes_up INTEGER NOT NULL, "
               "bytes_down INTEGER NOT NULL, seconds REAL NOT NULL, weight_change REAL, train_loss REAL, "
               "completed_at REAL NOT NULL)")
    db.execute("INSERT INTO rounds VALUES (1, 1, 0.5, 1.0, '[\"d\"]', '[\"d\"]', 10, 10, 1.0, 0.1, 1.0, 0)")
    db.commit()
    db.close()
    rounds = RunStore(tmp_path / "old").rounds()
    assert [(r["round"], r["kind"], r["stage"], r["device_metrics"]) for r in rounds] == [(1, "train", 0, None)]
    cfg = HubConfig(rounds=3)
    assert plan_position(cfg, cfg.stages(), rounds) == (0, 1)  # round 2 of the one train stage is next
