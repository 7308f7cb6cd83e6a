"""benchmarks/sign_uplink_mlp.py's bookkeeping: a finished fleet run is collected, not rerun;
the per-transport summary; and the flag that says both transports gave the same accuracy."""

from __future__ import annotations

import argparse
import json

import pytest

from .benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("sign_uplink_mlp.py")


def _cell(method: str, seed: int, transport: str, accuracy: list[float]) -> dict:
    return {"method": method, "seed": seed, "transport": transport, "accuracy": accuracy,
            "best_accuracy": max(accuracy), "final_accuracy": accuracy[-1], "uplink_bytes_per_device": 10.0}


def test_existing_run_is_collected_with_its_command(bench, tmp_path):
    args = argparse.Namespace(rounds=2, runs_dir=str(tmp_path))
    run_dir = tmp_path / bench.run_id("mpt-fl-1bit-sign", 3, "mqtt", 2)
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "transport": "mqtt", "rounds": [{"accuracy": 0.2}, {"accuracy": 0.5}],
        "uplink_bytes_per_device": 25223.0, "downlink_bytes_per_device": 795993.0, "wall_time_s": 1.0}))
    cell = bench.run_cell("mpt-fl-1bit-sign", 3, "mqtt", args)
    assert cell["best_accuracy"] == 0.5 and cell["final_accuracy"] == 0.5 and cell["transport"] == "mqtt"
    assert "--method mpt-fl-1bit-sign" in cell["command"] and "--seed 3" in cell["command"]
    assert "--transport mqtt" in cell["command"] and "--model mlp-mpt" in cell["command"]


def test_summary_and_same_accuracy_flag(bench):
    cells = [_cell("mpt-fl-1/32", s, t, [0.5, 0.6 + s / 100]) for s in (0, 2) for t in ("inproc", "mqtt")]
    rows = {(r["method"], r["transport"]): r for r in bench.summary(cells)}
    assert rows[("mpt-fl-1/32", "mqtt")]["best_mean"] == pytest.approx(61.0)
    assert rows[("mpt-fl-1/32", "mqtt")]["best_std"] == pytest.approx(1.0)
    assert bench.same_across_transports(cells) is True
    cells[-1] = _cell("mpt-fl-1/32", 2, "mqtt", [0.5, 0.61])
    assert bench.same_across_transports(cells) is False
    assert bench.same_across_transports([c for c in cells if c["transport"] == "inproc"]) is None
