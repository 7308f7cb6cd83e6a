"""The paper003 benchmark's bookkeeping: cells stopped after N rounds, and merging the result
files of several processes and machines into one table without double counting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.data import synthetic
from fedge.models.partition import PartitionSpec

from .benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("paper003.py")


def _cell(method: str, seed: int, accuracy: list[float], ratio: float = 0.8) -> dict:
    return {"method": method, "seed": seed, "model": "m", "prune_ratio": ratio, "size_bytes": 1, "sparsity": 0.0,
            "uplink": 10, "downlink": 10, "accuracy": accuracy, "rounds_done": len(accuracy),
            "best_accuracy": max(accuracy), "final_accuracy": accuracy[-1]}


def _part(path: Path, rounds: int, cells: list[dict], cuda: str | None) -> str:
    path.write_text(json.dumps({"rounds": rounds, "transport": "inproc", "cuda": cuda, "machine": {}, "cells": cells}))
    return str(path)


def test_stop_after_keeps_the_first_rounds_of_the_full_schedule(tmp_path, monkeypatch):
    """A fleet stopped after 2 of 6 rounds (what --stop-after does to each federated cell) equals
    the first 2 rounds of the 6-round run (same cosine schedule) and learns."""
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")
    ds = synthetic(n_train=600, n_test=200, seed=4)

    def run(stop_after: int | None) -> list[dict]:
        hub = HubConfig(fleet="t", model="mlp", rounds=6, clients_per_round=3, seed=0, deadline_s=60,
                        train={"epochs": 1, "batch_size": 20, "lr": 0.05, "lr_schedule": "cosine"})
        cfg = FleetConfig(devices=6, dataset="synthetic", partition=PartitionSpec(kind="iid", per_device=100),
                          transport="inproc", stop_after=stop_after, runs_dir=str(tmp_path), progress=False, hub=hub)
        with Fleet(cfg, dataset=ds) as fleet:
            return fleet.run()["rounds"]

    stopped, full = run(2), run(None)
    assert len(stopped) == 2 and len(full) == 6
    assert [r["accuracy"] for r in stopped] == [r["accuracy"] for r in full[:2]]
    assert max(r["accuracy"] for r in stopped) > 0.3  # learns (chance 0.1)


def test_merge_keeps_the_longest_cell_and_where_it_ran(bench, tmp_path):
    gpu = _part(tmp_path / "gpu.json", 50, [_cell("fedavg", 0, [0.2] * 50), _cell("mpt-fl-1/32", 0, [0.1] * 20)],
                "NVIDIA H200")
    cpu = _part(tmp_path / "cpu.json", 50, [_cell("mpt-fl-1/32", 0, [0.1] * 10), _cell("mpt-fl-1/32", 1, [0.3] * 20)],
                None)
    out = tmp_path / "merged.json"
    assert bench.merge([gpu, cpu], out) == 0
    merged = json.loads(out.read_text())
    cells = {(c["method"], c["seed"]): c for c in merged["cells"]}
    assert len(merged["cells"]) == 3  # the 10-round duplicate of (mpt-fl-1/32, 0) is dropped
    assert cells[("mpt-fl-1/32", 0)]["rounds_done"] == 20 and cells[("mpt-fl-1/32", 0)]["ran_on"] == "NVIDIA H200"
    assert cells[("mpt-fl-1/32", 1)]["ran_on"] == "CPU" and cells[("mpt-fl-1/32", 1)]["part"] == "cpu.json"
    row = next(r for r in merged["table"] if r["method"] == "mpt-fl-1/32")
    assert row["seeds"] == 2 and row["ran_on"] == ["CPU", "NVIDIA H200"]
    assert np.isclose(row["best_accuracy_mean"], 20.0) and row["common_rounds"] == 20
    # merging the merged file again keeps each cell's original part name
    again = tmp_path / "again.json"
    bench.merge([str(out)], again)
    assert {c["part"] for c in json.loads(again.read_text())["cells"]} == {"gpu.json", "cpu.json"}


def test_merge_refuses_parts_with_another_schedule(bench, tmp_path):
    a = _part(tmp_path / "a.json", 50, [_cell("fedavg", 0, [0.2] * 50)], None)
    b = _part(tmp_path / "b.json", 100, [_cell("fedavg", 1, [0.2] * 100)], None)
    with pytest.raises(SystemExit, match="--rounds 100"):
        bench.merge([a, b], tmp_path / "m.json")
