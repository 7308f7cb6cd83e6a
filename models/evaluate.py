"""The metrics of a model on a labelled set, as its family defines them; shared by the hub,
the fleet, the device's `evaluate` task and recipes."""

from __future__ import annotations

import torch
from torch import nn

from .families import CLASSIFICATION, Family


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             family: Family = CLASSIFICATION) -> dict[str, float]:
    """The family's metrics over the whole set (`family.metric_names`: classification 'loss'
    and 'accuracy' in [0,1]), in eval mode with no gradients, restoring the previous mode.
    What a metric covers is the family's: per-batch counts summed over the set (so F1 is the
    set's, not a mean over batches), or the whole set at once (a linear probe)."""
    was_training = model.training
    model.eval()
    try:
        return family.evaluate(model, x, y, batch_size)
    finally:
        model.train(was_training)
