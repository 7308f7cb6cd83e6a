"""The metrics of a model on a labelled set, as its family defines them; shared by the hub,
the fleet, the device's `evaluate` task and recipes."""

from __future__ import annotations

import torch
from torch import nn

from .families import CLASSIFICATION, Family


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             family: Family = CLASSIFICATION) -> dict[str, float]:
    """{'loss': ..., and the family's metrics} over the whole set (classification: 'accuracy'
    in [0,1]), in eval mode, restoring the previous mode. Per-batch counts are summed first, so
    metrics such as F1 are those of the set, not a mean over batches."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(x), batch_size):
        counts = family.counts(model(x[start : start + batch_size]), y[start : start + batch_size])
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    model.train(was_training)
    return family.metrics(totals)
