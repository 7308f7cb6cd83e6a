"""edge_agent/optimiser.py: LocalTrainer's own SGD/Adam give the weights torch.optim's foreach
SGD/Adam give, bit for bit (the device no longer builds torch.optim optimisers, which import
torch._dynamo), on a dense MLP that learns and on an MPT model's scores; a parameter that gets
no gradient at a step is skipped with its own state, as torch.optim does."""

from __future__ import annotations

import copy

import pytest
import torch

from fedge.edge_agent.optimiser import LocalOptimiser
from fedge.models.evaluate import evaluate
from fedge.models.registry import build_model

SETTINGS = {
    "sgd, momentum, weight decay": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd, plain": dict(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
    "adam, weight decay": dict(optimizer="adam", lr=0.002, momentum=0.0, weight_decay=1e-3),
}


def _torch_optim(params: list[torch.nn.Parameter], optimizer: str, lr: float, momentum: float,
                 weight_decay: float) -> torch.optim.Optimizer:
    """What LocalTrainer.train built before edge_agent/optimiser.py."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def _train_both(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict, epochs: int,
                batch: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same model trained twice on the same batches: with torch.optim and with LocalOptimiser."""
    ref, ours = model, copy.deepcopy(model)
    params_ref = [p for p in ref.parameters() if p.requires_grad]
    params_ours = [p for p in ours.parameters() if p.requires_grad]
    opt_ref = _torch_optim(params_ref, **settings)
    opt_ours = LocalOptimiser(params_ours, **settings)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for begin in range(0, len(y), batch):
            idx = order[begin : begin + batch]
            for net, opt in ((ref, opt_ref), (ours, opt_ours)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return ref, ours


def _assert_equal(ref: torch.nn.Module, ours: torch.nn.Module, start: torch.nn.Module) -> None:
    for (name, a), b, s in zip(ref.named_parameters(), ours.parameters(), start.parameters()):
        if a.requires_grad:
            assert not torch.equal(a, s), f"{name} did not train: the test would prove nothing"
        assert torch.equal(a, b), f"{name}: max difference {float((a - b).abs().max())}"


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_mlp_trains_bit_identically_to_torch_optim_and_learns(small_data, settings: dict) -> None:
    x, y = torch.from_numpy(small_data.train.x), torch.from_numpy(small_data.train.y)
    start = build_model("mlp", small_data.in_shape, 10, seed=0)
    ref, ours = _train_both(copy.deepcopy(start), x, y, settings, epochs=2, batch=32)
    _assert_equal(ref, ours, start)
    test_x, test_y = torch.from_numpy(small_data.test.x), torch.from_numpy(small_data.test.y)
    assert evaluate(ours, test_x, test_y)["accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mpt_scores_train_bit_identically_to_torch_optim(small_data, optimizer: str) -> None:
    """Conv-4 MPT (supermask scores, top-k mask in the forward): 12 steps of batch 10."""
    settings = dict(SETTINGS["sgd, momentum, weight decay"], lr=0.1) if optimizer == "sgd" else SETTINGS["adam, weight decay"]
    x, y = torch.from_numpy(small_data.train.x[:120]), torch.from_numpy(small_data.train.y[:120])
    start = build_model("conv4-mpt", small_data.in_shape, 10, seed=0)
    ref, ours = _train_both(copy.deepcopy(start), x, y, settings, epochs=1, batch=10)
    _assert_equal(ref, ours, start)


class _TwoHeads(torch.nn.Module):
    """The second head is used only at odd steps: its parameters miss gradients (and steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.extra = torch.nn.Linear(6, 4), torch.nn.Linear(4, 4)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.extra(h) if self.use_extra else h


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_parameters_without_gradient_are_skipped_as_torch_optim_skips_them(settings: dict) -> None:
    torch.manual_seed(0)
    start = _TwoHeads()
    ref, ours = start, copy.deepcopy(start)
    start = copy.deepcopy(start)
    opt_ref = _torch_optim(list(ref.parameters()), **settings)
    opt_ours = LocalOptimiser(list(ours.parameters()), **settings)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    for step in range(6):
        for net, opt in ((ref, opt_ref), (ours, opt_ours)):
            net.use_extra = step % 2 == 1 and step > 1  # extra's first step is step 3: later than body's
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    _assert_equal(ref, ours, start)
    if settings["optimizer"] == "adam":
        assert [opt_ours.state[i].step for i in range(4)] == [6, 6, 2, 2]
