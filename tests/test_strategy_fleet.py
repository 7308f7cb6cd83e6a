"""New strategies over a real broker: FedAvgM and FedProx learn on the synthetic data of the
other fleet tests, FedProx's mu reaches the devices in the task, and a FedAvgM run stopped
after round 2 and resumed ends on exactly the model of a run that never stopped."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec


def _fleet(url: str, prefix: str, tmp_path, data, run_id: str, strategy: str, options: dict,  # noqa: ANN001
           rounds: int = 3, devices: int = 4) -> Fleet:
    hub = HubConfig(fleet="strat", prefix=f"{prefix}/{run_id}", model="mlp", rounds=rounds, deadline_s=60,
                    strategy=strategy, strategy_options=dict(options),
                    train={"lr": 0.05, "batch_size": 32, "epochs": 1})
    cfg = FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid"), broker=url,
                      runs_dir=str(tmp_path), run_id=run_id, progress=False, hub=hub)
    return Fleet(cfg, dataset=data)


@pytest.mark.parametrize("strategy, options", [("fedavgm", {"server_momentum": 0.9, "server_lr": 1.0}),
                                               ("fedprox", {"proximal_mu": 0.01})])
def test_new_strategies_learn(embedded_broker, topic_prefix, tmp_path, small_data, strategy, options):
    tasks = []
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "learn", strategy, options) as fleet:
        hub = fleet.make_hub()
        threading.Thread(target=lambda: tasks.append(hub.wait_for_round(1, timeout=120)), daemon=True).start()
        report = fleet.run(hub)
    assert report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.5, report["final_accuracy"]  # chance is 0.10
    if strategy == "fedprox":
        assert tasks and tasks[0].train["proximal_mu"] == 0.01  # the devices were asked for the term


def test_fedavgm_resumed_run_ends_on_the_uninterrupted_model(embedded_broker, topic_prefix, tmp_path, small_data):
    options = {"server_momentum": 0.9, "server_lr": 0.5}
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "straight", "fedavgm", options) as fleet:
        straight = fleet.make_hub()
        fleet.run(straight)
    with _fleet(embedded_broker, topic_prefix, tmp_path, small_data, "stopped", "fedavgm", options) as fleet:
        first = fleet.make_hub()

        def stop_after_round_2() -> None:
            first.wait_for_round(3, timeout=120)
            first.stop()

        threading.Thread(target=stop_after_round_2, daemon=True).start()
        assert [r["round"] for r in first.run()] == [1, 2]
        assert set(first.store.load_server_state(2)) == {f"momentum/{k}" for k in first.reference}
        second = fleet.make_hub(resume=True)
        assert second.version == 2
        fleet.run(second)
    assert second.version == straight.version == 3
    for k, v in straight.global_state.items():
        assert np.array_equal(v, second.global_state[k]), k
    # without the momentum the resumed round would aggregate differently: refuse, do not drift
    second.store.server_state_path(3).unlink()
    with pytest.raises(ConfigError, match="keeps server state, but none was saved"):
        fleet.make_hub(resume=True)
