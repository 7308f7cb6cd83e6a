"""FedPM (models/supermask/fedpm.py, hub/strategies/fedpm.py): masks are drawn from
sigmoid(scores) with a straight-through gradient, evaluation uses sigmoid(scores) > 0.5, the
hub's Beta posterior gives the next keep-probabilities (reset or accumulated, and resumable),
bad updates are refused, and a short fleet run learns with one bit per weight up."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.store import RunStore
from fedge.hub.strategies import make_strategy
from fedge.hub.strategies.fedpm import scores_of, theta_of
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.registry import build_model, get_state, model_spec
from fedge.models.supermask import SupermaskLinear, materialize, supermask_layers
from fedge.models.supermask.fedpm import SAMPLE, seed_sampling, uplink_masks, use_sampled_masks


def _layer(scores: torch.Tensor) -> SupermaskLinear:
    layer = SupermaskLinear(scores.shape[1], scores.shape[0])
    with torch.no_grad():
        layer.scores.copy_(scores)
    use_sampled_masks(layer)
    return layer


def test_training_draws_masks_from_sigmoid_of_the_scores_with_a_straight_through_gradient():
    s = torch.tensor([[-3.0, -1.0, 0.0, 1.0, 3.0]]).repeat(400, 1)
    layer = _layer(s)
    seed_sampling(layer, 0)
    x = torch.ones(1, 5)
    w = layer.frozen.tensor(torch.device("cpu"))
    # each training forward draws a mask; a one-hot input reads column i of W * m back, and
    # the share of kept weights per column follows sigmoid(s)
    kept = torch.stack([layer(torch.eye(5)[i:i + 1]).detach()[0] / w[:, i] for i in range(5)], dim=1)
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert np.allclose(kept.mean(0).numpy(), torch.sigmoid(s[0]).numpy(), atol=0.07)
    # gradient: dL/ds = dL/dw_eff * W * sigmoid'(s), whatever mask was drawn
    layer.scores.grad = None
    layer(x).sum().backward()
    sig = torch.sigmoid(s)
    assert torch.allclose(layer.scores.grad, w * sig * (1 - sig), atol=1e-6)


def test_evaluation_and_export_use_the_mask_theta_above_one_half():
    model = build_model("mlp-fedpm", seed=0)
    assert all(layer.mask_rule == SAMPLE for _, layer in supermask_layers(model))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = model.eval()(x), model(x)  # deterministic: the same twice
        dense = materialize(model)(x)
    assert torch.equal(a, b) and torch.allclose(a, dense, atol=1e-5)
    for _, layer in supermask_layers(model):
        w = layer.frozen.tensor(torch.device("cpu"))
        assert torch.equal(layer.dense_weight(), w * (layer.scores.detach() > 0))


def test_uplink_is_one_draw_reproducible_from_the_job_seed():
    model = build_model("mlp-fedpm", seed=0)
    seed_sampling(model, 7)
    first = uplink_masks(model)
    seed_sampling(model, 7)
    again = uplink_masks(model)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    for name, layer in supermask_layers(model):
        theta = torch.sigmoid(layer.scores.detach()).numpy()
        assert first[name].dtype == np.bool_ and abs(first[name].mean() - theta.mean()) < 2 / np.sqrt(theta.size)  # 4 sd


def _masks(*rows: list[int]) -> list[tuple[OrderedDict, int]]:
    return [(OrderedDict(w=np.array(r, np.float32)), 40) for r in rows]


def test_posterior_reset_each_round_gives_the_beta_mean():
    s = make_strategy("fedpm", {"prior": 1.0, "prob_clip": 0.01})
    g = OrderedDict(w=np.zeros(3, np.float32))
    out = s(g, _masks([1, 1, 0], [1, 0, 0], [1, 0, 0]))
    # alpha = 1 + ones, beta = 1 + zeros: means 4/5, 2/5, 1/5
    assert np.allclose(theta_of(out["w"]), [0.8, 0.4, 0.2], atol=1e-6)
    again = s(out, _masks([0, 0, 0]))  # reset: only this round's one mask counts
    assert np.allclose(theta_of(again["w"]), [1 / 3] * 3, atol=1e-6)
    assert s.server_state() == {} and not s.stateful
    near_map = make_strategy("fedpm", {"prior": 1e-9})(g, _masks([1, 1, 1], [1, 1, 0]))
    assert np.allclose(theta_of(near_map["w"]), [0.99, 0.99, 0.5], atol=1e-6)  # clipped to [0.01, 0.99]


def test_accumulated_posterior_survives_the_run_store(tmp_path):
    rounds = [_masks([1, 0, 1], [1, 1, 0]), _masks([0, 0, 1]), _masks([1, 1, 1], [0, 1, 1], [0, 0, 0])]
    g = OrderedDict(w=np.zeros(3, np.float32))
    straight = make_strategy("fedpm", {"posterior": "accumulate"})
    h = g
    for ups in rounds:
        h = straight(h, ups)
    # counts of all 6 masks: ones 3, 3, 4 of 6 -> (1 + k) / 8
    assert np.allclose(theta_of(h["w"]), [4 / 8, 4 / 8, 5 / 8], atol=1e-6)
    first, k = make_strategy("fedpm", {"posterior": "accumulate"}), g
    for ups in rounds[:2]:
        k = first(k, ups)
    store = RunStore(tmp_path / "run")
    store.save_checkpoint(2, b"model", server_state=first.server_state())
    resumed = make_strategy("fedpm", {"posterior": "accumulate"})
    assert resumed.stateful
    resumed.load_server_state(store.load_server_state(2))
    assert np.array_equal(resumed(k, rounds[2])["w"], h["w"])
    with pytest.raises(ConfigError, match="unexpected server state"):
        make_strategy("fedpm").load_server_state(first.server_state())


def test_bad_options_and_updates_are_refused():
    for options, match in [({"prior": 0}, "prior"), ({"prob_clip": 0.5}, "prob_clip"),
                           ({"posterior": "sometimes"}, "posterior")]:
        with pytest.raises(ConfigError, match=match):
            make_strategy("fedpm", options)
    g = OrderedDict(w=np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="0/1 mask"):
        make_strategy("fedpm")(g, _masks([1, 0.5, 0]))
    with pytest.raises(ConfigError, match="sampled masks"):
        make_strategy("fedpm").check_fits(model_spec("mlp-mpt"), get_state(build_model("mlp-mpt")))
    assert np.all(np.isfinite(scores_of(np.array([0.0, 1.0]), 0.01)))


@pytest.mark.parametrize(("codec", "model_codec"), [("mask1", "fp32"), ("maskrc", "fp32"), ("maskrc", "q8")])
def test_fedpm_learns_through_the_fleet_with_one_bit_up(embedded_broker, topic_prefix, tmp_path, small_data, codec,
                                                        model_codec):
    """maskrc with a lossy downlink (q8): the hub must code against the keep-probabilities of
    the model as devices decoded it, or every update fails to decode (rejected_updates)."""
    import onnxruntime as ort

    from fedge.models.export import export

    hub = HubConfig(fleet="fedpm", prefix=topic_prefix, model="mlp-fedpm", rounds=3, deadline_s=60,
                    strategy="fedpm", strategy_options={"prior": 1e-3}, update_codec=codec, model_codec=model_codec,
                    train={"optimizer": "adam", "lr": 0.1, "epochs": 2, "batch_size": 32})
    cfg = FleetConfig(devices=4, dataset="synthetic", partition=PartitionSpec("iid"), broker=embedded_broker,
                      runs_dir=str(tmp_path), progress=False, hub=hub)
    with Fleet(cfg, dataset=small_data) as fleet:
        report = fleet.run()
    assert report["rounds_completed"] == 3 and report["rejected_updates"] == 0
    assert report["final_accuracy"] > 0.5, report["final_accuracy"]  # chance 0.10
    assert report["uplink_bytes_per_device"] < 198_800 / 8 + 2048  # one bit per weight + header
    if codec == "maskrc":  # rounds 2 and 3 code against polarised keep-probabilities: below 1 bit
        assert report["uplink_bytes_per_device"] < 198_800 / 8, report["uplink_bytes_per_device"]
    # the run's 1-bit file rebuilds the evaluated network (mask theta > 0.5) in ONNX
    summary = export(tmp_path / report["run_id"] / "final_model.mask", out=tmp_path / "fedpm.onnx")
    sess = ort.InferenceSession(summary["onnx"])
    logits = sess.run(None, {sess.get_inputs()[0].name: small_data.test.x[:400]})[0]
    accuracy = float((logits.argmax(1) == small_data.test.y[:400]).mean())
    assert abs(accuracy - report["final_accuracy"]) < 0.02, (accuracy, report["final_accuracy"])
