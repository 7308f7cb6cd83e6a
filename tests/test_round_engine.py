"""The round engine's rules, each checked where it lives: the re-run of a round that got too
few updates (over a real broker), the cosine learning-rate schedule, seeded device selection,
the memory-budget refusal, `fedge hub --no-eval`, and checkpoint pruning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedge.cli import main
from fedge.edge_agent.trainer import estimate_training_mb
from fedge.hub.config import HubConfig
from fedge.hub.rounds import round_train_settings, select_devices
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.store import RunStore
from fedge.models.partition import PartitionSpec
from fedge.models.registry import parameter_count


def _fleet(url: str, prefix: str, tmp_path: Path, data, devices: int, **hub_kw) -> Fleet:  # noqa: ANN001
    hub = HubConfig(fleet="engine", prefix=prefix, model="mlp", train={"lr": 0.05, "batch_size": 32}, **hub_kw)
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


# ----------------------------------------------------------------------------- re-run
def test_round_with_too_few_updates_is_re_run(mosquitto_url, topic_prefix, tmp_path, small_data, caplog):
    """min_updates=2 and dev001 answers 5 s late against a 4 s deadline: the first attempt closes
    with one update and is discarded, the round is re-run, and the re-run counts both devices
    (dev000 re-sends its update for the re-opened round; dev001's late one lands in it)."""
    fleet = _fleet(mosquitto_url, topic_prefix, tmp_path, small_data, devices=2, rounds=1, deadline_s=4,
                   min_updates=2)
    with fleet:
        fleet.agents[1].publish_delay_s = 5.0
        hub = fleet.make_hub()
        with caplog.at_level("INFO", logger="fedge.hub"):
            report = fleet.run(hub)
    assert "round 1 closed with 1/2 updates; ignored for this round: dev001" in caplog.text
    assert "round 1 got 1 update(s) < min_updates=2; re-running it (attempt 2)" in caplog.text
    assert [r["round"] for r in report["rounds"]] == [1]  # recorded once, from the re-run
    assert report["rounds"][0]["participants"] == ["dev000", "dev001"]
    assert report["rounds"][0]["seconds"] < 4 + 1  # the re-run's own time, not the failed attempt's
    assert hub.store.get_open_round() is None and hub.store.pending(1) == {}
    assert report["final_accuracy"] > 0.3  # chance is 0.1


# ----------------------------------------------------------------------------- cosine lr
def test_cosine_schedule_values_at_first_middle_and_last_round():
    train = {"lr": 0.1, "lr_schedule": "cosine", "epochs": 2}
    lrs = [round_train_settings(train, r, 10)["lr"] for r in (1, 6, 10)]
    assert lrs[0] == pytest.approx(0.1, abs=1e-12)  # full lr in round 1
    assert lrs[1] == pytest.approx(0.05, abs=1e-12)  # half way: cos(pi/2) = 0
    assert lrs[2] == pytest.approx(0.05 * (1 - math.cos(math.pi / 10)), abs=1e-12)  # 0.0024472
    assert lrs == sorted(lrs, reverse=True)
    settings = round_train_settings(train, 6, 10)
    assert "lr_schedule" not in settings and settings["epochs"] == 2  # devices get plain settings
    assert train["lr"] == 0.1 and train["lr_schedule"] == "cosine"  # the run's config is not changed
    assert round_train_settings({"lr": 0.1}, 10, 10) == {"lr": 0.1}  # no schedule: constant lr


# ----------------------------------------------------------------------------- selection
def test_seeded_selection_is_reproducible_and_depends_on_seed_round_and_attempt():
    online = [f"dev{i:03d}" for i in range(20)]
    first = select_devices(online, 5, seed=7, round_id=3)
    assert len(first) == len(set(first)) == 5 and set(first) <= set(online) and first == sorted(first)
    assert select_devices(list(reversed(online)), 5, seed=7, round_id=3) == first  # order of arrival: no matter
    assert select_devices(online, 5, seed=8, round_id=3) != first
    assert select_devices(online, 5, seed=7, round_id=4) != first
    assert select_devices(online, 5, seed=7, round_id=3, attempt=1) != first
    assert select_devices(online, 0, seed=7, round_id=3) == online  # 0 = every online device
    assert select_devices(online[:3], 5, seed=7, round_id=3) == online[:3]  # fewer online than asked
    # over many rounds every device gets picked: the choice is not stuck on a few
    picked = {d for r in range(1, 31) for d in select_devices(online, 5, seed=7, round_id=r)}
    assert picked == set(online)


# ----------------------------------------------------------------------------- memory budget
def test_profile_whose_memory_budget_is_too_small_is_refused(tmp_path, capsys):
    """Refused before connecting: the broker URL points at a closed port, so a missed check
    ends in a connection error after the agent's timeout, not in an agent that runs forever."""
    from fedge.hub.broker import free_port

    need = estimate_training_mb(parameter_count("mlp", (1, 28, 28), 10), 32, 28 * 28, "sgd")
    assert 3 < need < 100  # the MLP: a few MiB
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("name: tiny\nmodel: mlp\nbatch_size: 32\nmemory_budget_mb: 1\n")
    code = main(["agent", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--profile", str(tiny), "--data", "synthetic",
                 "--device-id", "small", "--once"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "profile 'tiny': training mlp needs about" in err and "above memory_budget_mb=1" in err, err
    assert "lower batch_size or raise the budget" in err


def test_memory_budget_that_fits_lets_the_agent_start(tmp_path, embedded_broker, topic_prefix, small_data):
    import dataclasses

    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile
    from fedge.models.wire import Topics
    from fedge.models.wire.transport import BrokerConfig

    need = estimate_training_mb(parameter_count("mlp", (1, 28, 28), 10), 32, 28 * 28, "sgd")
    pool = TrainingPool(workers=1, threads_per_worker=1)
    try:
        for budget, fits in ((math.ceil(need), True), (math.floor(need), False)):
            profile = dataclasses.replace(load_profile("sim"), model="mlp", batch_size=32, memory_budget_mb=budget)
            agent = Agent("edge", profile, BrokerConfig.from_url(embedded_broker), Topics("mem", topic_prefix),
                          small_data.train, 10, pool)
            if fits:
                agent.start(timeout=10).stop()
            else:
                with pytest.raises(ValueError, match=f"above memory_budget_mb={budget}"):
                    agent.start(timeout=10)
    finally:
        pool.close()


# ----------------------------------------------------------------------------- --no-eval
def test_hub_no_eval_records_no_accuracy_and_loads_no_test_set(embedded_broker, topic_prefix, tmp_path, small_data,
                                                              monkeypatch, capsys):
    import fedge.models.data as data_module

    def no_loading(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError(f"--no-eval loaded a dataset: {args}")

    monkeypatch.setattr(data_module, "load_dataset", no_loading)
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")
    fleet = _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=2)  # devices only: no hub
    with fleet:
        code = main(["hub", "--broker", embedded_broker, "--topic-prefix", topic_prefix, "--fleet", "engine",
                     "--no-eval", "--rounds", "2", "--min-devices", "2", "--wait-devices", "30", "--lr", "0.05",
                     "--runs-dir", str(tmp_path / "runs"), "--run-id", "blind", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out[out.index("{"):])
    assert summary["rounds"] == 2 and summary["final_accuracy"] is None
    history = RunStore(tmp_path / "runs" / "blind").rounds()
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["accuracy"] is None and r["loss"] is None and r["metrics"] is None for r in history), history
    assert all(r["participants"] == ["dev000", "dev001"] for r in history)  # the rounds did train


# ----------------------------------------------------------------------------- checkpoints
def test_only_the_configured_number_of_checkpoints_stays_on_disk(tmp_path):
    store = RunStore(tmp_path / "run")
    store.save_checkpoint(0, b"v0", keep=0)
    for version in range(1, 7):
        store.save_checkpoint(version, f"v{version}".encode(), keep=3)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # the initial model (a resume's starting point) plus the last 3; no temporary files left
    assert names == ["model_v00000.fedge", "model_v00004.fedge", "model_v00005.fedge", "model_v00006.fedge"]
    assert store.load_checkpoint(6) == b"v6"
    with pytest.raises(FileNotFoundError, match="model version 2"):
        store.load_checkpoint(2)


def test_fleet_run_keeps_keep_checkpoints(embedded_broker, topic_prefix, tmp_path, small_data):
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, devices=2, rounds=4, deadline_s=30,
                keep_checkpoints=2) as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 4
    names = sorted(p.name for p in (tmp_path / report["run_id"] / "checkpoints").iterdir())
    assert names == ["model_v00000.fedge", "model_v00003.fedge", "model_v00004.fedge"]
