"""Inputs of any channel count: a fleet learns a 6-channel image pair task end to end (data,
models, agents' checks, hub, run.json), and the per-channel normalisation, the device's input
loading and the torch-free predictor all take any C."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.models.data import synthetic_pairs
from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec

PAIR = (3, 8, 8)  # each image; the pair is [6, 8, 8]


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(n_train=600, n_test=400, num_classes=4, image=PAIR, seed=0)


def test_the_pair_task_needs_both_images(pairs) -> None:
    assert pairs.in_shape == (6, 8, 8) and pairs.num_classes == 4
    # the label is what `after` adds to `before`: their difference, minus noise, is the label's pattern
    diff = pairs.train.x[:, 3:] - pairs.train.x[:, :3]
    means = np.stack([diff[pairs.train.y == c].mean(0) for c in range(4)])
    nearest = np.argmin(((diff[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
    assert (nearest == pairs.train.y).mean() > 0.95


def test_a_fleet_learns_six_channel_pairs_with_conv4(pairs, tmp_path, monkeypatch) -> None:
    """Three devices over the in-memory transport train Conv-4 on 6-channel pairs: the test
    accuracy ends far above chance (0.25) and above what the `after` image alone allows
    (about 0.5 for an MLP trained to convergence on it)."""
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")
    from fedge.hub.config import HubConfig
    from fedge.hub.sim.fleet import Fleet, FleetConfig
    from fedge.models.partition import PartitionSpec
    from fedge.models.wire import decode
    from fedge.models.wire.messages import parse_model

    hub = HubConfig(fleet="pairs", model="conv4", rounds=3, deadline_s=120, seed=0,
                    train={"optimizer": "adam", "lr": 1e-3, "epochs": 1, "batch_size": 16})
    cfg = FleetConfig(devices=3, dataset="synthetic-pairs", partition=PartitionSpec("iid", per_device=200),
                      transport="inproc", runs_dir=str(tmp_path), progress=False, seed=0, hub=hub)
    with Fleet(cfg, dataset=pairs) as fleet:
        hub_obj = fleet.make_hub()
        report = fleet.run(hub_obj)
    accuracies = [r["accuracy"] for r in report["rounds"]]
    assert report["rounds_completed"] == 3 and report["rejected_updates"] == 0
    assert report["final_accuracy"] > 0.75, accuracies
    assert accuracies[-1] > accuracies[0] + 0.2, accuracies
    final = parse_model(decode(hub_obj.store.load_checkpoint(3)))
    assert final.meta["in_shape"] == [6, 8, 8] and final.tensors["features.0.weight"].shape == (64, 6, 3, 3)
    run = json.loads((tmp_path / report["run_id"] / "run.json").read_text())
    assert run["model"] == {"name": "conv4", "options": {}, "all_options": {}}
    assert run["config"]["hub"]["in_shape"] == [6, 8, 8]


def test_a_fleet_trains_a_spec_with_options_end_to_end(pairs, tmp_path, monkeypatch) -> None:
    """The spec travels: devices build the hub's MPT model with its prune ratio, seed and width
    (else the masks would not match), run.json and the 1-bit file record it."""
    monkeypatch.setenv("FEDGE_NO_ONNX", "1")
    from fedge.hub.config import HubConfig
    from fedge.hub.sim.fleet import Fleet, FleetConfig
    from fedge.models.maskfile import MaskFile
    from fedge.models.partition import PartitionSpec
    from fedge.models.registry import mask_file_spec

    spec = ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 11, "hidden": 64})
    hub = HubConfig(fleet="spec", model=spec, rounds=3, deadline_s=120, seed=0, strategy="mpt-score-avg",
                    train={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 2, "batch_size": 16})
    cfg = FleetConfig(devices=3, dataset="synthetic-pairs", partition=PartitionSpec("iid", per_device=200),
                      transport="inproc", runs_dir=str(tmp_path), progress=False, seed=0, hub=hub)
    with Fleet(cfg, dataset=pairs) as fleet:
        report = fleet.run()
    assert report["rejected_updates"] == 0 and report["rounds_completed"] == 3
    assert report["final_accuracy"] > 0.8, [r["accuracy"] for r in report["rounds"]]
    run_dir = tmp_path / report["run_id"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"]["name"] == "mlp-mpt" and run["model"]["options"] == {"hidden": 64, "prune_ratio": 0.5, "seed": 11}
    assert run["config"]["hub"]["model"] == {"name": "mlp-mpt", "options": {"hidden": 64, "prune_ratio": 0.5, "seed": 11}}
    mask_file = MaskFile.load(run_dir / report["files"]["mask_model"])
    assert mask_file_spec(mask_file) == spec and mask_file.in_shape == (6, 8, 8)


def test_models_build_from_any_channel_count() -> None:
    import torch

    from fedge.models.registry import build_model, model_family, model_names

    x = torch.zeros(2, 6, 8, 8)
    for name in model_names():
        model = build_model(name, (6, 8, 8), 4)
        if model_family(name).name == "contrastive":  # its output is the projection; its encoder reads the 6 channels
            assert model.embed(x).shape == (2, 200), name
        else:
            assert model(x).shape == (2, 4), name
    with pytest.raises(ConfigError, match=r"model conv4 takes inputs \[C, H, W\] with H, W >= 4 \(any C\); got in_shape \[6, 2"):
        build_model("conv4", (6, 2, 2), 4)
    with pytest.raises(ConfigError, match=r"model conv4-mpt takes inputs \[C, H, W\]"):
        build_model("conv4-mpt", (6, 64), 4)
    with pytest.raises(ConfigError, match="in_shape must be positive"):
        build_model("mlp", (6, 0, 8), 4)


def test_hub_config_refuses_a_bad_input_shape() -> None:
    from fedge.hub.config import HubConfig

    HubConfig(in_shape=(6, 8, 8)).check()
    for shape in ((6, 0, 8), (), (6.0, 8, 8)):
        with pytest.raises(ConfigError, match="in_shape must be positive whole numbers"):
            HubConfig(in_shape=shape).check()


def test_per_channel_normalisation_for_any_channel_count() -> None:
    from fedge.models.normalisation import channel_stats, normalise

    pixels = np.arange(6 * 4, dtype=np.uint8).reshape(1, 6, 2, 2) * 10
    means, stds = [0.1 * c for c in range(6)], [0.5 + 0.1 * c for c in range(6)]
    got = normalise(pixels, means, stds)
    for c in range(6):
        assert np.allclose(got[0, c], (pixels[0, c] / 255 - means[c]) / stds[c], atol=1e-6)
    assert np.array_equal(normalise(pixels, 0.5, 0.25), normalise(pixels, [0.5] * 6, [0.25] * 6))
    assert np.array_equal(normalise(pixels.transpose(0, 2, 3, 1), means, stds, channel_axis=-1),
                          got.transpose(0, 2, 3, 1))
    with pytest.raises(ConfigError, match=r"mean has 2 values for inputs of 6 channel\(s\)"):
        channel_stats([0.1, 0.2], 0.5, 6)
    with pytest.raises(ConfigError, match="std must be finite and positive"):
        channel_stats(0.1, [0.5, 0.5, 0.5, 0.5, 0.5, 0.0], 6)


def test_agent_data_and_model_input_checks(tmp_path) -> None:
    from fedge.cli.agent import load_local_data
    from fedge.edge_agent.task_checks import Refused, check_input

    x = np.random.default_rng(0).normal(size=(10, 6, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", x=x, y=np.arange(10) % 4)
    split = load_local_data(str(tmp_path / "pairs.npz"), num_classes=4)
    assert split.x.shape == (10, 6, 8, 8)
    check_input({"in_shape": [6, 8, 8], "num_classes": 4}, (6, 8, 8), 4)
    check_input({}, (6, 8, 8), 4)  # a hub before meta: nothing to compare
    with pytest.raises(Refused, match=r"the model takes inputs \[3, 8, 8\], this device's data is \[6, 8, 8\]"):
        check_input({"in_shape": [3, 8, 8]}, (6, 8, 8), 4)
    with pytest.raises(Refused, match="the model has 10 classes, this device's task has 4"):
        check_input({"in_shape": [6, 8, 8], "num_classes": 10}, (6, 8, 8), 4)
    with pytest.raises(Refused, match="meta 'in_shape' must be a list of whole numbers"):
        check_input({"in_shape": "6x8x8"}, (6, 8, 8), 4)


def test_predictor_and_inputs_take_six_channels(tmp_path) -> None:
    from fedge.edge_agent.infer import Predictor, load_inputs
    from fedge.edge_agent.infer.predictor import InferenceError
    from fedge.models.export import export, torch_logits
    from fedge.models.registry import build_model, set_state

    summary = export("conv4", out=tmp_path / "pairs.onnx", in_shape=(6, 8, 8), num_classes=4, seed=2)
    assert summary["in_shape"] == [6, 8, 8]
    predictor = Predictor.load(tmp_path / "pairs.onnx")
    assert predictor.in_shape == (6, 8, 8) and predictor.num_classes == 4
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(6, 8, 8)).astype(np.float32)
    assert predictor.as_batch(sample).shape == (1, 6, 8, 8)
    assert predictor.as_batch(np.stack([sample] * 3)).shape == (3, 6, 8, 8)
    with pytest.raises(InferenceError, match=r"fits neither \(6, 8, 8\)"):
        predictor.as_batch(sample[:3])
    # raw 6-channel pixels normalised with one mean/std per channel, as training would
    pixels = rng.integers(0, 256, size=(2, 6, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "pair.npy", pixels)
    means, stds = [0.4, 0.45, 0.5, 0.4, 0.45, 0.5], [0.2, 0.25, 0.3, 0.2, 0.25, 0.3]
    x, names = load_inputs([tmp_path / "pair.npy"], predictor.in_shape, means, stds)
    expected = (pixels / 255 - np.array(means).reshape(1, 6, 1, 1)) / np.array(stds).reshape(1, 6, 1, 1)
    assert names == [f"{tmp_path / 'pair.npy'}[0]", f"{tmp_path / 'pair.npy'}[1]"]
    assert np.allclose(x, expected, atol=1e-5)
    reference = build_model("conv4", (6, 8, 8), 4, seed=2)
    from fedge.models.export import load_source

    _, tensors, _, _, _ = load_source("conv4", in_shape=(6, 8, 8), num_classes=4, seed=2)
    set_state(reference, tensors)
    assert np.allclose(predictor.logits(x), torch_logits(reference, x), atol=1e-4)
    with pytest.raises(InferenceError, match=r"mean has 3 values for inputs of 6 channel"):
        load_inputs([tmp_path / "pair.npy"], predictor.in_shape, [0.4, 0.45, 0.5], 0.25)
    pytest.importorskip("PIL")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with pytest.raises(InferenceError, match="give inputs of other channel counts .* as .npy arrays"):
        load_inputs([tmp_path / "photo.png"], predictor.in_shape)


@pytest.mark.parametrize("spec", [ModelSpec("conv4"), ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 11, "hidden": 64}),
                                  ModelSpec("conv4-mpt", {"seed": 11})])
def test_six_channel_models_served_from_the_wire_match_torch(spec) -> None:
    """A 6-channel model message (its spec in the header) fills the model's graph template without
    torch: the first layer's input width follows in_shape, the options follow the header."""
    from fedge.edge_agent.infer import Predictor
    from fedge.models.export import PARITY_ATOL, torch_logits
    from fedge.models.registry import build_model, get_state
    from fedge.models.wire.messages import build_model_message

    model = build_model(spec, (6, 8, 8), 4, seed=3).eval()
    payload = build_model_message("pairs", "run-6", 1, spec, get_state(model), meta={"in_shape": [6, 8, 8], "num_classes": 4})
    predictor = Predictor.from_envelope(payload)
    assert predictor.in_shape == (6, 8, 8) and predictor.num_classes == 4 and predictor.spec == spec
    x = np.random.default_rng(1).normal(size=(32, 6, 8, 8)).astype(np.float32)
    ref = torch_logits(model, x)
    assert float(np.abs(predictor.logits(x) - ref).max()) <= PARITY_ATOL * max(1.0, float(np.abs(ref).max()))
