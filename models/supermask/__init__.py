"""Supermask layers for 1-bit Multi-Prize Lottery Tickets (MPT, Diffenderfer & Kailkhura 2021).

A supermask layer holds a frozen random weight W that is never trained and one trained score
per weight. In forward it keeps the top (1 - prune_ratio) fraction of |score| of the layer
(fedge's ``prune_ratio`` is the fraction REMOVED: 0.8 keeps 20 %; the MPT / edge-popup code's
``prune_rate`` / ``k`` is the fraction KEPT) and uses

* binarised (MPT 1/32, ``binarize=True``): ``w_eff = alpha * sign(W) * m`` with
  ``alpha = sum(|W| * m) / sum(m)`` per layer (biprop's GetQuantnet_binary; biprop divides by
  int(k * numel), we divide by the real kept count, which differs by at most one weight);
* plain edge-popup (``binarize=False``): ``w_eff = W * m``.

The gradient reaches the scores through a straight-through estimator: the mask function's
backward passes ``dL/dw_eff * W`` (for the binarised form: ``dL/dw_eff * sign(W)`` times |W|, the
same thing), and because the mask ranks |scores| autograd multiplies by sign(scores), as in
the reference code, which applies the mask function to ``scores.abs()``.

Storage: W lives as 1-bit signs in a ``bitarray`` (plus one scale per layer), regenerable from
(model seed, layer index); it is a plain attribute, NOT a parameter or buffer, so the module's
state_dict holds only the scores (and BatchNorm running statistics in 1/1 models) and
``models.registry.get_state`` returns exactly what travels. In training, each layer's conv /
linear is one autograd function (``SupermaskOp``) that keeps the input and the mask as packed
bits for backward, not the float masked weight: w_eff is built (in pieces where it can be)
in forward, dropped, and rebuilt from the 1-bit signs in backward, so training holds no
layer-sized float copy of W between the passes (docs/benchmarks.md has the RSS measured).

Also here: the binary activation of MPT 1/1 (sign with the piecewise-quadratic straight-through
gradient 2(1 - |x|) on |x| < 1), the latent-weight BNN layers of paper 003's baseline, mask
extraction, and ``materialize`` which turns any of these models into plain dense torch
modules (for ONNX export and inference).

The parts: ``frozen`` (the 1-bit frozen weights), ``topk`` (the mask from the scores),
``ops`` (the autograd functions), ``layers`` (the modules) and ``model`` (whole-model helpers
and ``materialize``). Import from this package; the names below are its public API.
"""

from __future__ import annotations

from .frozen import FrozenWeights
from .layers import (
    BinaryActivation,
    BinaryConv2d,
    BinaryLinear,
    BinaryWeightLayer,
    SignActivation,
    SupermaskConv2d,
    SupermaskLayer,
    SupermaskLinear,
)
from .model import (
    binary_weight_layers,
    layer_alphas,
    materialize,
    model_masks,
    set_scores,
    set_scores_from_masks,
    supermask_layers,
)
from .ops import SupermaskOp, SupermaskWeight
from .topk import mask_from_scores, topk_mask

__all__ = [
    "BinaryActivation",
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryWeightLayer",
    "FrozenWeights",
    "SignActivation",
    "SupermaskConv2d",
    "SupermaskLayer",
    "SupermaskLinear",
    "SupermaskOp",
    "SupermaskWeight",
    "binary_weight_layers",
    "layer_alphas",
    "mask_from_scores",
    "materialize",
    "model_masks",
    "set_scores",
    "set_scores_from_masks",
    "supermask_layers",
    "topk_mask",
]
