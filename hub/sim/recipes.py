"""Recipes: named experiment designs from the papers fedge comes from (see docs/recipes.md).

A recipe fills a FleetConfig; command-line flags override any of its fields afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

from fedge.hub.config import HubConfig
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.registry import model_spec

from .fleet import FleetConfig


def paper001() -> FleetConfig:
    """Paper 001: FedAvg on non-IID data, 10 clients each with one dominant label at 55 %
    and 5 % of every other label, a basic MLP, all clients every round, plus centralised
    training of the same MLP on the union for as many epochs as there are rounds.
    On Fashion-MNIST the 60,000 training images give 6,000 per device with no overlap."""
    return FleetConfig(
        devices=10,
        dataset="fashion-mnist",
        partition=PartitionSpec(kind="dominant", per_device=6000, dominant_fraction=0.55),
        central=True,
        recipe="paper001",
        hub=HubConfig(
            fleet="paper001", model="mlp", rounds=30, clients_per_round=10, min_devices=10,
            deadline_s=300, quorum=1.0, train={"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9},
        ),
    )


# paper 003's methods: model, strategy, local optimiser. The MPT code trains scores with SGD
# lr 0.1, momentum 0.9, weight decay 1e-4 and a cosine schedule (1/32), or Adam lr 0.1 (1/1).
_SGD_SCORES = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}
_ADAM_SCORES = {"optimizer": "adam", "lr": 0.1}
# FedPM: Adam on the scores (the reference code's optimiser, there lr 0.1); 0.03 and the
# near-MAP posterior (prior 1e-3) were best on the MLP counterpart (docs/benchmarks.md)
_FEDPM_SCORES = {"optimizer": "adam", "lr": 0.03}
_FEDPM_POSTERIOR = {"prior": 0.001}
_ADAM_BNN = {"optimizer": "adam", "lr": 1e-3}
_SGD_DENSE = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}
PAPER003_METHODS: dict[str, dict] = {
    # name: (model, strategy, optimiser settings, federated?)
    "dnn-central": {"model": "conv4", "strategy": "fedavg", "train": _SGD_DENSE, "federated": False},
    "mpt-central-1/32": {"model": "conv4-mpt", "strategy": "mpt-score-avg", "train": _SGD_SCORES, "federated": False},
    "fedavg": {"model": "conv4", "strategy": "fedavg", "train": _SGD_DENSE, "federated": True},
    "bnn-fl-1/1": {"model": "conv4-bnn11", "strategy": "fedavg", "train": _ADAM_BNN, "federated": True},
    "bnn-fl-1/32": {"model": "conv4-bnn", "strategy": "fedavg", "train": _ADAM_BNN, "federated": True},
    "mpt-fl-1/1": {"model": "conv4-mpt11", "strategy": "mpt-score-avg", "train": _ADAM_SCORES, "federated": True},
    "mpt-fl-1/32": {"model": "conv4-mpt", "strategy": "mpt-score-avg", "train": _SGD_SCORES, "federated": True},
    "mpt-fl-1bit": {"model": "conv4-mpt", "strategy": "mpt-mask", "train": _SGD_SCORES, "federated": True},
    # fedge's own: 1 bit per weight up as well, but the sign of each score's change (sign-delta)
    "mpt-fl-1bit-sign": {"model": "conv4-mpt", "strategy": "sign-delta", "train": _SGD_SCORES, "federated": True},
    # FedPM (Isik et al. 2023): masks drawn from sigmoid(scores), one sampled mask up, Beta posterior at the hub
    "fedpm": {"model": "conv4-fedpm", "strategy": "fedpm", "train": _FEDPM_SCORES, "federated": True,
              "strategy_options": _FEDPM_POSTERIOR},
    # the same, its masks range-coded with the global keep-probabilities as the model (codec maskrc)
    "fedpm-rc": {"model": "conv4-fedpm", "strategy": "fedpm", "train": _FEDPM_SCORES, "federated": True,
                 "strategy_options": _FEDPM_POSTERIOR, "update_codec": "maskrc"},
    # the same sign1 uplink, unbiased: stochastic signs (+-max|d| per tensor), alone or with
    # error feedback kept on each device between its participations (models/wire/sign_quant.py)
    "mpt-fl-1bit-stoch": {"model": "conv4-mpt", "strategy": "sign-delta", "train": _SGD_SCORES, "federated": True,
                          "strategy_options": {"quantiser": "stochastic"}},
    "mpt-fl-1bit-ef": {"model": "conv4-mpt", "strategy": "sign-delta", "train": _SGD_SCORES, "federated": True,
                       "strategy_options": {"quantiser": "stochastic", "error_feedback": True}},
    "mpt-fl-1bit-sign-ef": {"model": "conv4-mpt", "strategy": "sign-delta", "train": _SGD_SCORES, "federated": True,
                            "strategy_options": {"error_feedback": True}},
}


def paper003(method: str = "mpt-fl-1/32", prune_ratio: float = 0.8) -> FleetConfig:
    """Paper 003: 100 devices, 10 per round, each with 2 classes x 20 images (4,000 images),
    Conv-4; the method picks dense FedAvg, BNN-FL, MPT-FL (score averaging) or MPT-FL with a
    1-bit mask uplink. Local training: 5 epochs, batch 10 (the paper does not state its own)."""
    if method not in PAPER003_METHODS:
        raise ConfigError(f"unknown paper003 method {method!r}; choose one of {', '.join(PAPER003_METHODS)}")
    spec = PAPER003_METHODS[method]
    # the prune ratio is an option of the MPT models only; the dense and BNN methods prune nothing
    takes_ratio = spec["model"] in ("conv4-mpt", "conv4-mpt11")
    model = model_spec(spec["model"], {"prune_ratio": float(prune_ratio)} if takes_ratio else None)
    return FleetConfig(
        devices=100,
        dataset="fashion-mnist",
        partition=PartitionSpec(kind="shards", classes_per_device=2, images_per_class=20),
        central=not spec["federated"],
        recipe="paper003",
        hub=HubConfig(
            fleet="paper003", model=model, rounds=100, clients_per_round=10, deadline_s=600, quorum=1.0,
            strategy=spec["strategy"], eval_size=2000, update_codec=spec.get("update_codec"),
            strategy_options=dict(spec.get("strategy_options", {})),
            train={"epochs": 5, "batch_size": 10, **spec["train"]},
        ),
    )


RECIPES: dict[str, Callable[..., FleetConfig]] = {"paper001": paper001, "paper003": paper003}


def get_recipe(name: str, **options: object) -> FleetConfig:
    """A recipe's FleetConfig; options (e.g. method, prune_ratio for paper003) go to the recipe."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    options = {k: v for k, v in options.items() if v is not None}
    if name == "paper001" and options:
        raise ConfigError(f"recipe paper001 takes no options (got {', '.join(options)})")
    return RECIPES[name](**options)
