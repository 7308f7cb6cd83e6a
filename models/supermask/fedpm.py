"""FedPM's probabilistic masks (Isik et al., ICLR 2023, "Sparse Random Networks for
Communication-Efficient Federated Learning").

A layer with ``mask_rule == "sample"`` keeps weight i with probability theta_i = sigmoid(s_i):
in training every forward draws m ~ Bernoulli(theta) and the gradient passes straight through
the draw (dL/dtheta = dL/dm, then sigmoid's derivative), so the scores learn keep-probabilities
rather than a top-k ranking. After training a device uploads ONE sampled mask (codec mask1,
1 bit per weight); the hub turns the masks into a Beta posterior (hub/strategies/fedpm.py).

Evaluation and export use the deterministic mask theta > 0.5 (s > 0, the posterior's most
likely mask), so the hub's accuracy and the ONNX model are one fixed network; the reference
code (BerivanIsik/sparse-random-networks) evaluates a sampled mask, which is noisier.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .layers import SupermaskLayer

SAMPLE = "sample"  # SupermaskLayer.mask_rule of a FedPM layer ("topk": MPT's top-k of |scores|)


def _layers(model: nn.Module) -> list[tuple[str, SupermaskLayer]]:
    """(scores state name, layer) of every supermask layer (model.supermask_layers, which this
    module, imported by layers.py, cannot import)."""
    return [(f"{name}.scores" if name else "scores", m) for name, m in model.named_modules()
            if hasattr(m, "mask_rule") and hasattr(m, "frozen")]


def sampled_forward(layer: SupermaskLayer, x: torch.Tensor) -> torch.Tensor:
    """op(x, W * m) with m ~ Bernoulli(sigmoid(s)) and the straight-through gradient."""
    theta = torch.sigmoid(layer.scores)
    drawn = torch.bernoulli(theta.detach(), generator=layer.sampler)
    mask = drawn + theta - theta.detach()  # value: the draw; gradient: d/dtheta
    w = layer.frozen.tensor(x.device, x.dtype)
    return layer.apply_weight(x, w * mask)


def use_sampled_masks(model: nn.Module) -> nn.Module:
    """Turn every supermask layer of `model` into a FedPM layer (in place); returns it."""
    for _, layer in _layers(model):
        layer.mask_rule = SAMPLE
    return model


def seed_sampling(model: nn.Module, seed: int) -> None:
    """One seeded generator for all of the model's mask draws in a job (reproducible runs)."""
    gen = torch.Generator().manual_seed(int(seed))
    for _, layer in _layers(model):
        layer.sampler = gen


@torch.no_grad()
def uplink_masks(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The masks a device uploads: a FedPM layer's one draw from Bernoulli(sigmoid(s)), any
    other supermask layer's current (top-k) mask."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, layer in _layers(model):
        if layer.mask_rule == SAMPLE:
            theta = torch.sigmoid(layer.scores.detach().float())
            out[name] = torch.bernoulli(theta, generator=layer.sampler).bool().cpu().numpy()
        else:
            out[name] = layer.mask().cpu().numpy().copy()
    return out
