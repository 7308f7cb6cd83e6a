"""Whole-model helpers: find the supermask / BNN layers, read and write masks and scores,
and ``materialize``, which turns any of these models into plain dense torch modules (for
ONNX export and inference).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..bits import scores_from_keep_prob
from .layers import BinaryActivation, BinaryWeightLayer, SignActivation, SupermaskLayer


def supermask_layers(model: nn.Module) -> Iterator[tuple[str, SupermaskLayer]]:
    """(scores state name, layer) for every supermask layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SupermaskLayer):
            yield (f"{name}.scores" if name else "scores"), module


def binary_weight_layers(model: nn.Module) -> list[tuple[str, BinaryWeightLayer]]:
    """(latent weight state name, layer) for every BNN layer, in module order."""
    return [(f"{name}.weight", m) for name, m in model.named_modules() if isinstance(m, BinaryWeightLayer)]



def model_masks(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Current masks, keyed like the scores in get_state ('net.0.scores'), as boolean numpy."""
    return OrderedDict((name, layer.mask().cpu().numpy().copy()) for name, layer in supermask_layers(model))




def layer_alphas(model: nn.Module) -> OrderedDict[str, float]:
    return OrderedDict((name, layer.alpha()) for name, layer in supermask_layers(model))


@torch.no_grad()
def set_scores(model: nn.Module, scores: Mapping[str, np.ndarray]) -> None:
    """Write score arrays (keyed like model_masks) into the supermask layers."""
    layers = dict(supermask_layers(model))
    for name, arr in scores.items():
        if name not in layers:
            raise KeyError(f"{name!r} is not a supermask layer's scores")
        t = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        if tuple(t.shape) != layers[name].weight_shape:
            raise ValueError(f"{name!r}: shape {tuple(t.shape)} != {layers[name].weight_shape}")
        layers[name].scores.copy_(t)


@torch.no_grad()
def set_scores_from_masks(
    model: nn.Module, masks: Mapping[str, np.ndarray], scale: float | None = None, tie_eps: float = 1e-3
) -> None:
    """Scores whose top-k is the given masks (or keep probabilities in [0, 1]).

    Uses bits.scores_from_keep_prob with the current scores as tie-breaker. A boolean mask
    with exactly `kept` ones per layer is reproduced exactly by the next forward.
    """
    current = OrderedDict((n, l.scores.detach().cpu().numpy()) for n, l in supermask_layers(model))
    probs = OrderedDict((n, np.asarray(m, dtype=np.float32)) for n, m in masks.items())
    set_scores(model, scores_from_keep_prob(probs, previous=current, scale=scale, tie_eps=tie_eps))



# ----------------------------------------------------------------------------- materialize

_DENSE_LAYERS = (SupermaskLayer, BinaryWeightLayer)


def _has_special(module: nn.Module) -> bool:
    return any(isinstance(m, _DENSE_LAYERS + (BinaryActivation,)) for m in module.modules())


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, _DENSE_LAYERS):
        return module.to_dense()
    if isinstance(module, BinaryActivation):
        return SignActivation()
    if not _has_special(module):
        return copy.deepcopy(module)
    if type(module) is nn.Sequential:
        return nn.Sequential(OrderedDict((name, _convert(child)) for name, child in module.named_children()))
    # a custom container: shallow structure copy, then replace the children
    clone = copy.copy(module)
    clone._modules = OrderedDict()  # type: ignore[attr-defined]
    clone._parameters = OrderedDict(  # type: ignore[attr-defined]
        (k, None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad)) for k, v in module._parameters.items()
    )
    clone._buffers = OrderedDict((k, None if v is None else v.detach().clone()) for k, v in module._buffers.items())  # type: ignore[attr-defined]
    for name, child in module.named_children():
        clone._modules[name] = _convert(child)  # type: ignore[attr-defined]
    return clone


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A plain dense torch model computing the same function, for ONNX export and inference.

    Supermask / BNN layers become nn.Conv2d / nn.Linear (no bias) holding the effective
    weights (alpha * sign(W) * mask), binary activations become SignActivation; BatchNorm,
    pooling, ReLU and Flatten are copied. A model whose body is `model.net` (the MPT nets)
    comes back as that nn.Sequential. The result is in eval mode on the model's device.
    """
    is_net = isinstance(getattr(model, "net", None), nn.Sequential) and getattr(model, "forward_is_net", False)
    body = model.net if is_net else model
    dense = _convert(body)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        dense = dense.to(ref.device)
    return dense.eval()
