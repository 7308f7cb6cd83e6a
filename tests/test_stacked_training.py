"""Stacked training (edge_agent/stacked.py) gives what LocalTrainer.train gives one job at a
time: the same trained tensors, loss and running accuracy for devices of different sizes,
partial last batches, SGD with momentum and weight decay, Adam, FedProx and a private head;
and it refuses, with the reason, the models it cannot reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedge.edge_agent.stacked import StackJob, prefer_stacked, stackable, train_stacked
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
from fedge.models.errors import ConfigError
from fedge.models.families import CLASSIFICATION
from fedge.models.registry import build_model, get_state
from fedge.models.spec import ModelSpec

SHAPE = (1, 8, 8)
SIZES = (50, 37, 64, 5)  # batch 16 leaves a partial last batch on all but 64


def _jobs(spec: ModelSpec, sizes: tuple[int, ...] = SIZES) -> list[StackJob]:
    """Devices with their own start state (as a private head would differ), data and seed."""
    gen = torch.Generator().manual_seed(0)
    return [StackJob(state=get_state(build_model(spec, SHAPE, 10, seed=i)),
                     x=torch.randn(n, *SHAPE, generator=gen), y=torch.randint(0, 10, (n,), generator=gen),
                     seed=100 + i)
            for i, n in enumerate(sizes)]


def _assert_same_as_one_by_one(spec: ModelSpec, cfg: TrainConfig, max_stack: int | None = None,
                               sizes: tuple[int, ...] = SIZES) -> None:
    trainer = LocalTrainer(spec, SHAPE, 10, fused=False)  # compare with the autograd loop
    jobs = _jobs(spec, sizes)
    stacked = train_stacked(trainer.model, trainer.family, jobs, cfg, max_stack=max_stack)
    for job, got in zip(jobs, stacked):
        ref = trainer.train(job.state, job.x, job.y, cfg, job.seed)
        want = {**ref.state, **ref.private}
        assert list(got.state) == list(get_state(trainer.model)), "every tensor, in get_state's order"
        assert got.num_samples == len(job.y) and got.private == {}
        for key, value in want.items():
            assert got.state[key].dtype == np.float32
            scale = max(1.0, float(np.abs(value).max()))
            np.testing.assert_allclose(got.state[key], value, rtol=0, atol=1e-5 * scale, err_msg=key)
            assert not np.array_equal(value, job.state[key]), f"{key} did not train: the test would prove nothing"
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        assert got.accuracy == pytest.approx(ref.accuracy)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mlp_equals_one_by_one_training(optimizer: str) -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05 if optimizer == "sgd" else 0.01, optimizer=optimizer,
                      momentum=0.9, weight_decay=1e-3)
    _assert_same_as_one_by_one(ModelSpec("mlp", {"hidden": 16}), cfg)


def test_private_head_fedprox_and_stacks_of_two_equal_one_by_one_training() -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, proximal_mu=0.3)
    _assert_same_as_one_by_one(ModelSpec("mlp-private-head", {"hidden": 16}), cfg, max_stack=2)


def test_conv4_equals_one_by_one_training() -> None:
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.0)
    _assert_same_as_one_by_one(ModelSpec("conv4"), cfg, sizes=(12, 5))


def test_stacked_devices_learn(small_data) -> None:  # noqa: ANN001
    """Four devices of 400 images train stacked; each one's model classifies held-out data well
    above chance (10 classes)."""
    trainer = LocalTrainer("mlp", small_data.in_shape, 10)
    start = get_state(build_model("mlp", small_data.in_shape, 10, seed=0))
    x, y = torch.from_numpy(small_data.train.x), torch.from_numpy(small_data.train.y)
    jobs = [StackJob(start, x[i * 400 : (i + 1) * 400], y[i * 400 : (i + 1) * 400], seed=i) for i in range(4)]
    results = train_stacked(trainer.model, trainer.family, jobs, TrainConfig(epochs=3, batch_size=32, lr=0.05))
    test_x, test_y = torch.from_numpy(small_data.test.x), torch.from_numpy(small_data.test.y)
    for result in results:
        assert trainer.evaluate(result.state, test_x, test_y)["accuracy"] > 0.5
        assert result.accuracy > 0.3 and result.seconds > 0


def _refusal(model: nn.Module, family=CLASSIFICATION) -> str | None:  # noqa: ANN001
    return stackable(model, family, TrainConfig())


@pytest.mark.parametrize("name, says", [("mlp-mpt", "SupermaskLinear"), ("mlp-bnn", "BinaryLinear"),
                                        ("conv4-mpt11", "SupermaskConv2d"), ("mlp-contrastive", "augmentations")])
def test_registered_models_it_cannot_reproduce_are_refused_with_the_reason(name: str, says: str) -> None:
    trainer = LocalTrainer(name, SHAPE, 10)
    reason = _refusal(trainer.model, trainer.family)
    assert reason is not None and says in reason
    with pytest.raises(ConfigError, match=says):
        train_stacked(trainer.model, trainer.family, _jobs(trainer.spec, (4,)), TrainConfig())
    assert not prefer_stacked(trainer.model, trainer.family, TrainConfig(), 10)


def test_batchnorm_and_dropout_are_refused() -> None:
    assert "BatchNorm" in (_refusal(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))) or "")
    assert "dropout" in (_refusal(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5))) or "")
    for name in ("mlp", "mlp-private-head", "conv4"):
        trainer = LocalTrainer(name, SHAPE, 10)
        assert _refusal(trainer.model, trainer.family) is None, name


def test_prefer_stacked_picks_linear_models_of_several_jobs_on_the_cpu() -> None:
    mlp, conv = LocalTrainer("mlp", SHAPE, 10), LocalTrainer("conv4", SHAPE, 10)
    assert not prefer_stacked(mlp.model, mlp.family, TrainConfig(), 10), "fused one by one is faster"
    assert prefer_stacked(mlp.model, mlp.family, TrainConfig(), 10, fused=False)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))  # not fused: stacks
    assert prefer_stacked(tanh, mlp.family, TrainConfig(), 10)
    assert not prefer_stacked(mlp.model, mlp.family, TrainConfig(), 2)
    assert not prefer_stacked(conv.model, conv.family, TrainConfig(), 10)


def test_after_step_runs_every_stacked_step_and_its_exception_stops_training() -> None:
    trainer = LocalTrainer(ModelSpec("mlp", {"hidden": 8}), SHAPE, 10)
    jobs = _jobs(trainer.spec)
    elapsed: list[float] = []
    train_stacked(trainer.model, trainer.family, jobs, TrainConfig(epochs=2, batch_size=16), after_step=elapsed.append)
    assert len(elapsed) == 2 * 4  # the longest device: 64 samples, 4 batches per epoch
    assert elapsed == sorted(elapsed)

    def budget(seconds: float) -> None:
        raise TimeoutError("over budget")

    with pytest.raises(TimeoutError, match="over budget"):
        train_stacked(trainer.model, trainer.family, jobs, TrainConfig(), after_step=budget)


def test_a_job_missing_a_tensor_is_named() -> None:
    trainer = LocalTrainer(ModelSpec("mlp", {"hidden": 8}), SHAPE, 10)
    jobs = _jobs(trainer.spec, (4, 4))
    del jobs[1].state["net.3.bias"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"misses tensor 'net.3.bias'"):
        train_stacked(trainer.model, trainer.family, jobs, TrainConfig())
