"""Whole runs of the non-classification families through the fleet (in-memory transport, real hub
and agents): run.json, the stop rule, the plot and the CLI's summary name the family's
metrics, and no accuracy appears where the family has none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fedge.cli import main
from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.models.partition import PartitionSpec
from fedge.models.registry import MODELS, Registered

from .family_data import TinySeg, as_dataset, bright_squares, shifted_patterns


@pytest.fixture(autouse=True)
def _no_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")  # export is not what these tests are about


def _keys(obj: object) -> set[str]:
    """Every key anywhere in a JSON document."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def _plot_label(path: Path) -> str:
    """The y label the run's plot was drawn with (written into the PNG's Description)."""
    with Image.open(path) as image:
        return image.text["Description"]


def test_segmentation_run_reports_f1_and_iou_and_stops_on_its_target(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """A tiny segmentation net over 3 devices: a train stage that stops once the global model's
    F1 (the family's headline) reaches 0.5, then an evaluate round on the devices' own masks;
    with the centralised baseline. run.json leads with F1 and carries every segmentation metric,
    and has no accuracy key anywhere; the plot is f1.png, labelled F1. (Measured: F1 0.13 after
    round 1, 0.80 after round 2.)"""
    monkeypatch.setitem(MODELS, "test-tiny-seg", Registered(TinySeg, family="segmentation"))
    data = as_dataset("squares", bright_squares(360, seed=0), bright_squares(128, seed=1), num_classes=1)
    hub = HubConfig(fleet="seg", model="test-tiny-seg", deadline_s=120, seed=0, target_score=0.5,
                    plan=[{"kind": "train", "rounds": 8}, {"kind": "evaluate", "rounds": 1}],
                    train={"optimizer": "adam", "lr": 0.003, "epochs": 1, "batch_size": 16})
    cfg = FleetConfig(devices=3, dataset="squares", partition=PartitionSpec("iid"), transport="inproc",
                      runs_dir=str(tmp_path), run_id="seg", progress=False, central=True, seed=0, hub=hub)
    with Fleet(cfg, dataset=data) as fleet:
        report = fleet.run()

    run = json.loads((tmp_path / "seg" / "run.json").read_text())
    assert run["family"] == "segmentation" and run["headline"] == "f1"
    assert set(run["final_metrics"]) == {"loss", "precision", "recall", "f1", "iou"}
    share = float(data.test.y.mean())
    trivial = 2 * share / (share + 1)  # the F1 of the all-positive mask
    assert run["final_metrics"]["f1"] > max(0.6, trivial + 0.4) and run["final_metrics"]["iou"] > 0.45, run["final_metrics"]
    # the stop rule read F1: the train stage ended at the first round whose F1 reached 0.5
    train = [r for r in run["rounds"] if r["kind"] == "train"]
    assert train[-1]["metrics"]["f1"] >= 0.5 and all(r["metrics"]["f1"] < 0.5 for r in train[:-1]), \
        [r["metrics"]["f1"] for r in train]
    assert 2 <= len(train) < 8 and run["rounds"][-1]["kind"] == "evaluate"
    # the evaluate round: every device scored the model on its own masks; run.json has their mean
    assert set(run["device_metrics_mean"]) == {"loss", "precision", "recall", "f1", "iou"}
    assert run["device_metrics_mean"]["f1"] > 0.6
    assert set(run["central_metrics"]) == set(run["final_metrics"]) and run["central"]["best_f1"] > 0.6
    assert run["federated_over_central"] == pytest.approx(run["final_metrics"]["f1"] / run["central_metrics"]["f1"])
    assert not {"accuracy", "final_accuracy", "central_accuracy", "device_accuracy", "best_accuracy"} & _keys(run)
    assert run == json.loads(json.dumps(report, default=str))  # what fleet.run returned is what it wrote
    assert run["files"]["plot"] == "f1.png" and not (tmp_path / "seg" / "accuracy.png").exists()
    assert _plot_label(tmp_path / "seg" / "f1.png") == "y: test F1 (%)"
    partition = json.loads((tmp_path / "seg" / "partition.json").read_text())  # masks: [no positive, some positive]
    assert partition["images_per_device"] == [120, 120, 120] and partition["devices"]["dev000"] == [0, 120]


def test_contrastive_run_reports_the_linear_probe(tmp_path: Path) -> None:
    """mlp-contrastive, 2 rounds over 3 devices of shifted class patterns: the global model's
    linear-probe accuracy leads run.json and rises well above the untrained network's and
    chance (0.1). (Measured: 0.50 untrained, 0.78 and 0.85 after rounds 1 and 2.)"""
    data = as_dataset("patterns", shifted_patterns(1200, seed=1), shifted_patterns(600, seed=2), num_classes=10)
    hub = HubConfig(fleet="ssl", model="mlp-contrastive", rounds=2, deadline_s=120, seed=0,
                    train={"optimizer": "adam", "lr": 1e-3, "epochs": 4, "batch_size": 32})
    cfg = FleetConfig(devices=3, dataset="patterns", partition=PartitionSpec("iid"), transport="inproc",
                      runs_dir=str(tmp_path), run_id="ssl", progress=False, seed=0, hub=hub)
    with Fleet(cfg, dataset=data) as fleet:
        hub_obj = fleet.make_hub()
        untrained = hub_obj.metrics(hub_obj.global_state, full=True)
        run = fleet.run(hub_obj)
    assert run["family"] == "contrastive" and run["headline"] == "probe_accuracy"
    assert set(run["final_metrics"]) == {"loss", "probe_accuracy"}
    assert run["final_metrics"]["probe_accuracy"] > max(0.7, untrained["probe_accuracy"] + 0.2), (untrained, run["final_metrics"])
    assert run["rounds"][1]["metrics"]["loss"] < run["rounds"][0]["metrics"]["loss"]
    assert not {"accuracy", "final_accuracy", "device_accuracy"} & _keys(run)
    assert _plot_label(tmp_path / "ssl" / "probe_accuracy.png") == "y: test linear-probe accuracy (%)"


def test_fleet_command_prints_the_family_s_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fedge fleet --model mlp-contrastive`: the printed summary and the results line name the
    probe, not an accuracy."""
    code = main(["fleet", "--transport", "inproc", "--dataset", "synthetic", "--partition", "iid", "--devices", "2",
                 "--rounds", "1", "--model", "mlp-contrastive", "--runs-dir", str(tmp_path), "--run-id", "cli-ssl",
                 "--no-progress", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    printed = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert printed["headline"] == "probe_accuracy" and set(printed["final_metrics"]) == {"loss", "probe_accuracy"}
    assert "final_accuracy" not in printed and "device_accuracy" not in printed
    assert "probe_accuracy.png" in out and (tmp_path / "cli-ssl" / "probe_accuracy.png").exists()


def test_target_score_is_the_old_target_accuracy() -> None:
    """A run stored before families (target_accuracy) resumes with the same stop rule; the CLI
    keeps --target-accuracy as a name of --target."""
    assert HubConfig.from_json({"target_accuracy": 0.7}).target_score == 0.7
    import argparse

    from fedge.cli.hub import _add_round_args, _apply_round_args

    parser = argparse.ArgumentParser()
    _add_round_args(parser)
    for flag in ("--target", "--target-accuracy"):
        cfg = HubConfig()
        _apply_round_args(cfg, parser.parse_args([flag, "0.8"]))
        assert cfg.target_score == 0.8, flag


def test_a_contrastive_model_is_not_exported_as_a_predictor(tmp_path: Path) -> None:
    """Its output is a projection; ONNX export (and so the predictor) refuses it with the reason."""
    from fedge.models.export import ExportError, export

    with pytest.raises(ExportError, match="projection, not a prediction"):
        export("mlp-contrastive", out=tmp_path / "ssl.onnx")
