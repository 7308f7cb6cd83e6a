"""Fault injection over real brokers: broker restart, hub SIGKILL + resume, agent crash and
restart, a slow device. Each test adds to the fault tally printed at the end of the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from fedge.edge_agent.agent import Agent
from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.store import RunStore
from fedge.models.partition import PartitionSpec

from .fault_tally import TALLY
from .mosquitto_proc import MosquittoProcess


def _fleet(url: str, prefix: str, tmp_path, data, devices: int = 3, rounds: int = 3, **hub_kw) -> Fleet:
    hub = HubConfig(fleet="faults", prefix=prefix, model="mlp", rounds=rounds, deadline_s=60,
                    train={"lr": 0.05, "batch_size": 32}, **hub_kw)
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


def _lost(history: list[dict], agents: list[Agent], run_id: str) -> int:
    """Updates a device published for an open round that the hub did not count."""
    lost = 0
    for rec in history:
        for agent in agents:
            if (run_id, rec["round"]) in agent._done and agent.device_id not in rec["participants"]:
                lost += 1
    return lost


def test_broker_restart_mid_round_loses_nothing(tmp_path, topic_prefix, small_data, mosquitto_bin):
    broker = MosquittoProcess(tmp_path / "broker").start()
    try:
        fleet = _fleet(broker.url, topic_prefix, tmp_path, small_data, devices=3, rounds=3)
        with fleet:
            hub = fleet.make_hub()
            for agent in fleet.agents:
                agent.publish_delay_s = 1.5  # updates are in flight while the broker is down

            def bounce() -> None:  # round 2 open and every device training: its update will be in flight
                hub.wait_for_round(2, timeout=120)
                for agent in fleet.agents:
                    agent.training.wait(30)
                broker.restart(down_seconds=2.0)

            threading.Thread(target=bounce, daemon=True).start()
            report = fleet.run(hub)
            lost = _lost(report["rounds"], fleet.agents, hub.run_id)
    finally:
        broker.stop()
    TALLY.record(faults=1, rounds=report["rounds_completed"], lost=lost)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(sorted(r["participants"]) == ["dev000", "dev001", "dev002"] for r in report["rounds"])
    assert lost == 0
    assert report["final_accuracy"] > 0.4


def test_hub_sigkill_mid_round_then_resume(tmp_path, topic_prefix, small_data, mosquitto_bin):
    broker = MosquittoProcess(tmp_path / "broker").start()
    runs = tmp_path / "runs"
    hub_cmd = [sys.executable, "-m", "fedge.cli", "hub", "--broker", broker.url, "--topic-prefix", topic_prefix,
               "--fleet", "faults", "--dataset", "synthetic", "--runs-dir", str(runs), "-q"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        fleet = _fleet(broker.url, topic_prefix, tmp_path, None, devices=3)
        fleet.cfg.dataset = "synthetic"
        with fleet:
            for agent in fleet.agents:
                agent.publish_delay_s = 0.3
            first = subprocess.Popen(hub_cmd + ["--run-id", "killed", "--rounds", "4", "--min-devices", "3",
                                                "--lr", "0.05", "--deadline", "60"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            store_path = runs / "killed"
            deadline = time.time() + 120
            killed_in = None
            while time.time() < deadline and first.poll() is None:
                if (store_path / "run.sqlite").exists():
                    store = RunStore(store_path)
                    open_round = store.get_open_round()
                    if open_round and open_round[0] == 2 and store.pending(2):
                        first.send_signal(signal.SIGKILL)
                        killed_in = 2
                        store.close()
                        break
                    store.close()
                time.sleep(0.02)  # another process's store: nothing to wait on but the file itself
            first.wait(10)
            assert killed_in == 2, first.stdout.read().decode()[-3000:]
            second = subprocess.run(hub_cmd + ["--resume", "killed"], env=env, capture_output=True, text=True,
                                    timeout=240)
            assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
            history = RunStore(store_path).rounds()
            lost = _lost(history, fleet.agents, "killed")
    finally:
        broker.stop()
    TALLY.record(faults=1, rounds=len(history), lost=lost)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert [r["model_version"] for r in history] == [1, 2, 3, 4]
    assert lost == 0
    assert json.loads(second.stdout)["final_accuracy"] > 0.4


def test_agent_killed_mid_training_rejoins(embedded_broker, topic_prefix, tmp_path, small_data):
    fleet = _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=3, rounds=3)
    fleet.cfg.hub.deadline_s = 6
    with fleet:
        hub = fleet.make_hub()
        victim = fleet.agents[2]
        victim.publish_delay_s = 1.0
        replacement: list[Agent] = []

        def kill_and_restart() -> None:
            assert victim.training.wait(60)  # selected and training (round 1: all devices are selected)
            victim.crash()  # mid-training: its result is never published
            time.sleep(1.0)  # the device stays dead for a second (simulated downtime, not a wait)
            again = Agent(victim.device_id, victim.profile, fleet.broker_config, victim.topics,
                          fleet.dataset.train.subset(fleet.parts[2]), fleet.dataset.num_classes, fleet.pool)
            replacement.append(again.start())

        threading.Thread(target=kill_and_restart, daemon=True).start()
        report = fleet.run(hub)
        rounds = report["rounds"]
        for agent in replacement:
            agent.stop()
    TALLY.record(faults=1, rounds=len(rounds), lost=0)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "dev002" in rounds[-1]["participants"], rounds  # rejoined and took part again
    assert replacement and replacement[0].rounds_trained >= 1


def test_slow_device_is_dropped_for_its_round_and_never_mixed_into_the_next(
        embedded_broker, topic_prefix, tmp_path, small_data, caplog):
    fleet = _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=3, rounds=3)
    fleet.cfg.hub.deadline_s = 3
    with fleet:
        hub = fleet.make_hub()
        slow = fleet.agents[0]
        slow.publish_delay_s = 4.5  # always past the 3 s deadline
        with caplog.at_level("INFO", logger="fedge.hub"):
            report = fleet.run(hub)
    TALLY.record(faults=1, rounds=report["rounds_completed"], lost=0)
    assert all("dev000" not in r["participants"] for r in report["rounds"])
    assert all(len(r["participants"]) == 2 for r in report["rounds"])
    reasons = [r["reason"] for r in hub.store.rejections()]
    assert any("late or replayed: round 1 is already closed" in r for r in reasons), reasons
    assert "ignored for this round: dev000" in caplog.text



def test_a_store_upgraded_by_another_process_meanwhile_still_opens(tmp_path, monkeypatch):
    """A store from before the newer round columns, opened at once by two processes (the CI saw
    a resumed hub and the test's reader race): between this process reading the columns and
    adding them, the other adds one. Opening must still work."""
    import sqlite3

    from fedge.hub import store as store_module

    old = sqlite3.connect(tmp_path / "run.sqlite")
    old.execute("CREATE TABLE rounds (round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, accuracy REAL, loss REAL, "
                "participants TEXT NOT NULL, selected TEXT NOT NULL, bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL, "
                "seconds REAL NOT NULL, weight_change REAL, train_loss REAL, completed_at REAL NOT NULL)")
    old.close()
    connect = sqlite3.connect

    class OtherProcessFirst:
        """A connection whose column listing is followed at once by another connection's ALTER."""

        def __init__(self, *args, **kwargs) -> None:
            self._db = connect(*args, **kwargs)

        def execute(self, sql: str, *args):
            result = self._db.execute(sql, *args)
            if sql.startswith("PRAGMA table_info(rounds)"):
                rows = result.fetchall()
                other = connect(tmp_path / "run.sqlite")
                other.execute("ALTER TABLE rounds ADD COLUMN metrics TEXT")
                other.commit()
                other.close()
                return iter(rows)
            return result

        def __getattr__(self, name: str):
            return getattr(self._db, name)

    monkeypatch.setattr(store_module.sqlite3, "connect", OtherProcessFirst)
    store_module.RunStore(tmp_path).close()
    monkeypatch.setattr(store_module.sqlite3, "connect", connect)
    columns = {row[1] for row in sqlite3.connect(tmp_path / "run.sqlite").execute("PRAGMA table_info(rounds)")}
    assert {"kind", "stage", "metrics", "device_metrics"} <= columns
