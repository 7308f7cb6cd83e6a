"""Task families (models/families.py): segmentation metrics against values worked out by hand,
classification through the family bit-identical to plain cross-entropy / argmax, and a tiny
segmentation model that learns through the real LocalTrainer."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
from fedge.models.errors import ConfigError
from fedge.models.evaluate import evaluate
from fedge.models.families import CLASSIFICATION, CONTRASTIVE, FAMILIES, SEGMENTATION, get_family, segmentation_metrics
from fedge.models.registry import MODELS, Registered, build_model, get_state, model_family, model_names, set_state
from fedge.models.spec import ModelSpec

from .family_data import TinySeg, bright_squares

TRUTH = torch.zeros(1, 1, 4, 4)
TRUTH[0, 0, 1:3, 1:3] = 1.0  # 4 positive pixels of 16


def seg_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Metrics of a hard prediction (1 = positive), as logits of +-5."""
    return segmentation_metrics(SEGMENTATION.counts(torch.where(pred > 0, 5.0, -5.0), truth))


def test_perfect_mask_scores_one_and_the_loss_of_a_confident_right_pixel() -> None:
    scores = seg_scores(TRUTH, TRUTH)
    assert (scores["precision"], scores["recall"], scores["f1"], scores["iou"]) == (1.0, 1.0, 1.0, 1.0)
    assert scores["loss"] == pytest.approx(math.log1p(math.exp(-5)), rel=1e-5)


def test_all_wrong_mask_scores_zero() -> None:
    scores = seg_scores(1 - TRUTH, TRUTH)  # tp 0, fp 12, fn 4
    assert (scores["precision"], scores["recall"], scores["f1"], scores["iou"]) == (0.0, 0.0, 0.0, 0.0)
    assert scores["loss"] == pytest.approx(math.log1p(math.exp(5)), rel=1e-5)


def test_partial_mask_by_hand() -> None:
    pred = torch.zeros_like(TRUTH)
    pred[0, 0, 1:3, 1] = 1  # 2 right
    pred[0, 0, 1, 2] = 1  # 1 right (tp 3, fn 1)
    pred[0, 0, 0, 0:3] = 1  # 3 false positives
    scores = seg_scores(pred, TRUTH)
    assert scores["precision"] == pytest.approx(3 / 6)
    assert scores["recall"] == pytest.approx(3 / 4)
    assert scores["f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    assert scores["iou"] == pytest.approx(3 / 7)
    wrong = 4  # pixels on the wrong side of 0: 3 fp + 1 fn
    assert scores["loss"] == pytest.approx((wrong * math.log1p(math.exp(5)) + 12 * math.log1p(math.exp(-5))) / 16, rel=1e-5)


def test_empty_prediction_on_a_positive_truth_scores_zero() -> None:
    scores = seg_scores(torch.zeros_like(TRUTH), TRUTH)  # tp 0, fp 0, fn 4: precision 0/0 -> 0
    assert (scores["precision"], scores["recall"], scores["f1"], scores["iou"]) == (0.0, 0.0, 0.0, 0.0)


def test_empty_truth() -> None:
    empty = torch.zeros_like(TRUTH)
    right = seg_scores(empty, empty)  # nothing to find, nothing predicted: perfect
    assert (right["precision"], right["recall"], right["f1"], right["iou"]) == (1.0, 1.0, 1.0, 1.0)
    wrong = seg_scores(TRUTH, empty)  # tp 0, fp 4, fn 0: recall 0/0 -> 0
    assert (wrong["precision"], wrong["recall"], wrong["f1"], wrong["iou"]) == (0.0, 0.0, 0.0, 0.0)


def test_metrics_are_of_the_whole_set_not_a_mean_over_batches() -> None:
    """Image 1 is perfect (tp 4), image 2 predicts 4 pixels on an empty truth (fp 4): F1 over the
    set is 8/12, a mean of per-image F1s would be 0.5."""
    x = torch.cat([torch.where(TRUTH > 0, 5.0, -5.0)] * 2)
    y = torch.cat([TRUTH, torch.zeros_like(TRUTH)])
    for batch_size in (1, 2):
        scores = evaluate(nn.Identity(), x, y, batch_size=batch_size, family=SEGMENTATION)
        assert scores["f1"] == pytest.approx(8 / 12) and scores["precision"] == pytest.approx(0.5)
        assert scores["recall"] == 1.0 and scores["iou"] == pytest.approx(0.5)


def test_segmentation_rejects_a_mask_that_does_not_fit_the_output() -> None:
    with pytest.raises(ConfigError, match="segmentation target has 8 values for 16 logits"):
        SEGMENTATION.counts(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4))


def test_registered_models_name_their_family_and_unknown_families_are_named() -> None:
    assert model_family("mlp-contrastive") is CONTRASTIVE
    assert all(model_family(name) is CLASSIFICATION for name in model_names() if name != "mlp-contrastive")
    assert model_family(ModelSpec("conv4-mpt", {"prune_ratio": 0.5})) is CLASSIFICATION
    with pytest.raises(ConfigError, match="unknown model family 'contrastve'"):
        get_family("contrastve")


def test_every_family_evaluates_to_its_metric_names_led_by_loss_with_its_headline_among_them() -> None:
    """run.json, the plots and the stop rule read `metric_names` and `headline`; evaluate must keep to them."""
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(40, 1, 16, 16, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    masks = (torch.rand(40, 1, 16, 16, generator=gen) > 0.7).float()
    cases = {"classification": (build_model("mlp", (1, 16, 16), 3, seed=0), labels),
             "segmentation": (TinySeg((1, 16, 16), 1), masks),
             "contrastive": (build_model("mlp-contrastive", (1, 16, 16), 3, seed=0), labels)}
    assert set(cases) == set(FAMILIES)
    for name, (model, y) in cases.items():
        family = get_family(name)
        assert family.metric_names[0] == "loss" and family.headline in family.metric_names
        assert tuple(evaluate(model, x, y, batch_size=16, family=family)) == family.metric_names, name


def test_classification_evaluate_is_bit_identical_to_cross_entropy_and_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2300, 1, 28, 28, generator=gen), torch.randint(0, 10, (2300,), generator=gen)
    model = build_model("mlp", seed=3)
    scores = evaluate(model, x, y, batch_size=1000)
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            logits = model(x[start : start + 1000])
            total += float(F.cross_entropy(logits, y[start : start + 1000], reduction="sum"))
            correct += int((logits.argmax(1) == y[start : start + 1000]).sum())
    assert scores == {"loss": total / 2300, "accuracy": correct / 2300}  # exact, not approx


def test_classification_training_is_bit_identical_to_a_plain_cross_entropy_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 1, 28, 28, generator=gen), torch.randint(0, 10, (200,), generator=gen)
    start = get_state(build_model("mlp", seed=5))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9)
    result = LocalTrainer("mlp", (1, 28, 28), 10).train(start, x, y, cfg, seed=11)

    model = build_model("mlp")
    set_state(model, start)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.0)
    order_gen = torch.Generator().manual_seed(11)
    total, correct = 0.0, 0
    for _ in range(2):
        order = torch.randperm(200, generator=order_gen)
        for begin in range(0, 200, 32):
            idx = order[begin : begin + 32]
            opt.zero_grad(set_to_none=True)
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
    assert (result.loss, result.accuracy) == (total / 400, correct / 400)
    for name, value in get_state(model).items():
        assert np.array_equal(result.state[name], value), name


def test_tiny_segmentation_model_learns_through_the_local_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, "test-tiny-seg", Registered(TinySeg, family="segmentation"))
    x, y = bright_squares(256, seed=0)
    tx, ty = bright_squares(128, seed=1)
    trainer = LocalTrainer("test-tiny-seg", (1, 16, 16), 1)
    assert trainer.family is SEGMENTATION
    start = get_state(build_model("test-tiny-seg", (1, 16, 16), 1, seed=0))
    before = trainer.evaluate(start, tx, ty)
    result = trainer.train(start, x, y, TrainConfig(epochs=6, batch_size=16, lr=0.01, optimizer="adam"), seed=0)
    after = trainer.evaluate(result.state, tx, ty)
    # the best trivial predictor, every pixel positive: precision = positive share, recall 1
    share = float(ty.mean())
    trivial_f1 = 2 * share / (share + 1)
    assert after["f1"] > max(0.8, trivial_f1 + 0.5, before["f1"] + 0.3), (before, after)
    assert after["iou"] > 0.7 and after["loss"] < before["loss"]
    assert set(after) == {"loss", "precision", "recall", "f1", "iou"}
    assert 0.9 < result.accuracy <= 1.0  # the trainer's running score: pixel accuracy


def test_design_doc_shows_the_real_code() -> None:
    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "design.md").read_text().split("## Task families", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    source = (root / "models" / "families.py").read_text()
    assert len(blocks) == 5
    for block in blocks:
        assert block in source, block[:80]
