"""FedProx on the device: mu travels in the task, the agent's checks accept only a finite
mu >= 0, mu = 0 trains exactly as FedAvg's local step, and mu > 0 pulls toward the global."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.task_checks import Refused, check_train_settings
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig, _step
from fedge.models.registry import build_model, get_state


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in a))


@pytest.fixture(scope="module")
def job(small_data):  # noqa: ANN001, ANN201
    trainer = LocalTrainer("mlp", small_data.in_shape, small_data.num_classes)
    start = get_state(build_model("mlp", small_data.in_shape, small_data.num_classes, seed=3))
    x, y = torch.from_numpy(small_data.train.x[:400]), torch.from_numpy(small_data.train.y[:400])
    return trainer, start, x, y


def test_mu_zero_is_fedavgs_local_step_bit_for_bit(job):
    trainer, start, x, y = job
    plain = trainer.train(start, x, y, TrainConfig(epochs=2, lr=0.05), seed=7)
    prox0 = trainer.train(start, x, y, TrainConfig.resolve(load_profile("sim"), {"epochs": 2, "lr": 0.05,
                                                                                 "proximal_mu": 0.0}), seed=7)
    assert all(np.array_equal(plain.state[k], prox0.state[k]) for k in plain.state)
    assert plain.loss == prox0.loss


def test_positive_mu_pulls_the_local_model_toward_the_global(job):
    trainer, start, x, y = job
    far = [_distance(trainer.train(start, x, y, TrainConfig(epochs=3, lr=0.05, proximal_mu=mu), seed=7).state, start)
           for mu in (0.0, 0.1, 1.0)]
    assert far[0] > far[1] > far[2] > 0, far
    assert far[2] < 0.8 * far[0], far  # a strong pull, not rounding


def test_the_step_minimises_loss_plus_mu_half_squared_distance():
    """By hand: with anchors a, SGD (no momentum) moves p by -lr * (dL/dp + mu (p - a))."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    xb, yb = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    params = list(model.parameters())
    anchors = [p.detach() - 0.5 for p in params]  # the global, away from the current weights
    before = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xb), yb), params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.0)
    _step(model, opt, xb, yb, torch.Generator(), (0.2, params, anchors))
    for p, b, g, a in zip(params, before, grads, anchors):
        torch.testing.assert_close(p.detach(), b - 0.1 * (g + 0.2 * (b - a)))


@pytest.mark.parametrize("mu", [0, 0.01, 2.5])
def test_agent_accepts_a_finite_non_negative_mu(mu):
    check_train_settings({"proximal_mu": mu}, load_profile("sim"), 100)
    assert TrainConfig.resolve(load_profile("sim"), {"proximal_mu": mu}).proximal_mu == mu


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_agent_refuses_any_other_mu(mu):
    with pytest.raises(Refused, match="proximal_mu"):
        check_train_settings({"proximal_mu": mu}, load_profile("sim"), 100)
