"""Recipes: named experiment designs from the papers fedge comes from (see docs/recipes.md).

A recipe fills a FleetConfig; command-line flags override any of its fields afterwards.
"""

from __future__ import annotations

from typing import Callable

from models.partition import PartitionSpec

from .fleet import FleetConfig
from .hub import HubConfig


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


RECIPES: dict[str, Callable[[], FleetConfig]] = {"paper001": paper001}


def get_recipe(name: str) -> FleetConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
