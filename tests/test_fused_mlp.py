"""Fused (autograd-free) MLP training (edge_agent/fused_mlp.py) gives what LocalTrainer.train's
autograd loop gives: the same trained tensors, loss and running accuracy, over several epochs
with a partial last batch, SGD with momentum and weight decay, Adam, FedProx and a private
head; it honours the time budget after every step and refuses what it cannot reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge.edge_agent.fused_mlp import fused_reason
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
from fedge.models.registry import build_model, get_state
from fedge.models.spec import ModelSpec

SHAPE = (1, 8, 8)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


CASES = [
    TrainConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3),
    TrainConfig(epochs=2, batch_size=7, lr=0.05, momentum=0.0),
    TrainConfig(epochs=2, batch_size=16, lr=0.01, optimizer="adam", weight_decay=1e-3),
    TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, proximal_mu=0.3),
]


@pytest.mark.parametrize("spec", [ModelSpec("mlp", {"hidden": 16}), ModelSpec("mlp-private-head", {"hidden": 16})])
@pytest.mark.parametrize("cfg", CASES)
def test_fused_equals_autograd_training(spec: ModelSpec, cfg: TrainConfig) -> None:
    fused, plain = LocalTrainer(spec, SHAPE, 10), LocalTrainer(spec, SHAPE, 10, fused=False)
    assert fused_reason(fused.model, fused.family, cfg) is None
    start = get_state(build_model(spec, SHAPE, 10, seed=3))
    x, y = _data(53)  # 53 rows: every batch size above leaves a partial last batch
    got, ref = fused.train(start, x, y, cfg, seed=11), plain.train(start, x, y, cfg, seed=11)
    assert list(got.state) == list(ref.state) and list(got.private) == list(ref.private)
    for key, value in {**ref.state, **ref.private}.items():
        have = {**got.state, **got.private}[key]
        assert have.dtype == np.float32
        np.testing.assert_allclose(have, value, rtol=0, atol=1e-5 * max(1.0, float(np.abs(value).max())), err_msg=key)
        assert not np.array_equal(value, start[key]), f"{key} did not train: the test would prove nothing"
    assert got.num_samples == ref.num_samples == 53
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    assert got.accuracy == pytest.approx(ref.accuracy)


def test_fused_honours_the_time_budget_after_every_step() -> None:
    trainer = LocalTrainer("mlp", SHAPE, 10)
    calls: list[float] = []

    def budget(elapsed: float) -> None:
        calls.append(elapsed)
        if len(calls) == 3:
            raise TimeoutError("over budget")

    x, y = _data(100)
    with pytest.raises(TimeoutError):
        trainer.train(get_state(trainer.model), x, y, TrainConfig(batch_size=10), seed=1, after_step=budget)
    assert len(calls) == 3 and calls == sorted(calls)


def test_fused_refuses_what_it_cannot_reproduce() -> None:
    cfg = TrainConfig()
    for name in ("conv4", "mlp-mpt", "mlp-bnn"):
        trainer = LocalTrainer(name, (1, 28, 28), 10)
        assert fused_reason(trainer.model, trainer.family, cfg) is not None, name
    contrastive = LocalTrainer("mlp-contrastive", SHAPE, 10)
    assert "family" in str(fused_reason(contrastive.model, contrastive.family, cfg))


def test_fused_training_learns(small_data) -> None:  # noqa: ANN001
    """The fused path trains a model that classifies held-out data well above chance."""
    trainer = LocalTrainer("mlp", small_data.in_shape, 10)
    start = get_state(build_model("mlp", small_data.in_shape, 10, seed=0))
    x, y = torch.from_numpy(small_data.train.x), torch.from_numpy(small_data.train.y)
    result = trainer.train(start, x, y, TrainConfig(epochs=3, batch_size=32, lr=0.05), seed=0)
    test_x, test_y = torch.from_numpy(small_data.test.x), torch.from_numpy(small_data.test.y)
    assert trainer.evaluate(result.state, test_x, test_y)["accuracy"] > 0.6
