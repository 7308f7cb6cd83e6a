"""Centralised baseline: the run's model trained on the union of every device's data.

Same model, initial weights and optimiser settings as the federated run, one epoch per
round, so run.json's `central_metrics` (and `federated_over_central`, the ratio of the model
family's headline metrics) answers "what did federation cost?".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
from fedge.hub.rounds import round_train_settings
from fedge.models.data import Dataset
from fedge.models.evaluate import evaluate
from fedge.models.registry import build_model, get_state, model_spec
from fedge.models.spec import ModelSpec


def train_central(dataset: Dataset, parts: list[np.ndarray], model: ModelSpec | str, train: dict, epochs: int, seed: int = 0,
                  profile: str = "sim", progress: bool = False, curve: list[dict] | None = None) -> dict[str, Any]:
    """Train epoch by epoch; each epoch's test metrics (the model family's) are appended to
    `curve` as it ends. Returns the final epoch's `metrics`, the best headline metric over the
    epochs (`best_<headline>`, e.g. best_accuracy) and the curve."""
    model = model_spec(model)
    prof = replace(load_profile(profile), model=model)
    idx = np.concatenate(parts)
    device = torch.device(prof.device)
    x, y = torch.from_numpy(dataset.train.x[idx]), torch.from_numpy(dataset.train.y[idx])
    tx, ty = torch.from_numpy(dataset.test.x).to(device), torch.from_numpy(dataset.test.y).to(device)
    trainer = LocalTrainer(model, dataset.in_shape, dataset.num_classes, device=prof.device)
    state = get_state(build_model(model, dataset.in_shape, dataset.num_classes, seed=seed))
    curve = [] if curve is None else curve

    for epoch in tqdm(range(1, epochs + 1), desc="central baseline", unit="epoch", disable=not progress):
        cfg = TrainConfig.resolve(prof, {**round_train_settings(train, epoch, epochs), "epochs": 1})
        result = trainer.train(state, x, y, cfg, seed=seed * 7919 + epoch)
        state = {**result.state, **result.private}  # one central model: its private tensors too
        scores = evaluate(trainer.model, tx, ty, family=trainer.family)
        curve.append({"epoch": epoch, **scores})
    headline = trainer.family.headline
    last = {k: v for k, v in curve[-1].items() if k != "epoch"} if curve else None
    return {"epochs": epochs, "headline": headline, "metrics": last,
            f"best_{headline}": max((c[headline] for c in curve), default=None), "curve": curve,
            "train_images": int(len(idx))}
