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
``models.registry.get_state`` returns exactly what travels. W is materialised as a float
tensor for one layer at a time, in forward and again in backward, and dropped after use.

Also here: the binary activation of MPT 1/1 (sign with the piecewise-quadratic straight-through
gradient 2(1 - |x|) on |x| < 1), the latent-weight BNN layers of paper 003's baseline, mask
extraction, and ``materialize`` which turns any of these models into plain dense torch
modules (for ONNX export and inference).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from bitarray import bitarray
from torch import nn

from .bits import (
    RELU_GAIN,
    _topk_flat,
    WEIGHT_INITS,
    from_bitarray,
    keep_count,
    regenerate_normal,
    regenerate_signs,
    scores_from_keep_prob,
    to_bitarray,
    weight_scale,
)

# ----------------------------------------------------------------------------- frozen weights


class FrozenWeights:
    """The never-trained random weight of one supermask layer, stored as 1-bit signs.

    ``signed_constant`` (default, the MPT/edge-popup "signed Kaiming constant"):
    ``W = sign(N(0,1)) * gain / sqrt(fan_in)``, gain sqrt(2): the signs bitarray plus one float
    IS the weight. ``kaiming_normal``: ``W ~ N(0, gain^2 / fan_in)``; the signs are cached and
    the magnitudes are regenerated from (seed, index) whenever the float weight is needed.
    """

    def __init__(self, shape: tuple[int, ...], seed: int, index: int, init: str = "signed_constant") -> None:
        if init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight init {init!r}; known: {WEIGHT_INITS}")
        self.shape = tuple(int(d) for d in shape)
        self.seed = int(seed)
        self.index = int(index)
        self.init = init
        self.scale = weight_scale(self.shape, RELU_GAIN)
        if init == "signed_constant":
            signs = regenerate_signs(self.seed, self.index, self.shape)
        else:
            signs = regenerate_normal(self.seed, self.index, self.shape) >= 0
        self.signs: bitarray = to_bitarray(signs)

    @property
    def numel(self) -> int:
        return len(self.signs)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the stored weight (the bitarray's buffer)."""
        return self.signs.nbytes

    def sign_array(self) -> np.ndarray:
        """Boolean signs (True = positive), shaped like the weight."""
        return from_bitarray(self.signs, self.shape)

    def tensor(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Materialise W as a float tensor (a fresh tensor each call).

        On an accelerator the float copy is kept there and cloned per call: GPU memory is not
        the constraint, and re-uploading W at every forward and backward dominated step time.
        On the CPU (the edge device) nothing is cached: W exists only while a layer runs."""
        if device is not None and torch.device(device).type != "cpu":
            key = (str(device), dtype)
            cache = self.__dict__.setdefault("_device_cache", {})
            if key not in cache:
                cache[key] = self._materialise(dtype).to(device)
            return cache[key].clone()
        w = self._materialise(dtype)
        return w if device is None else w.to(device)

    def _materialise(self, dtype: torch.dtype) -> torch.Tensor:
        if self.init == "signed_constant":
            bits = np.unpackbits(np.frombuffer(memoryview(self.signs), dtype=np.uint8), count=self.numel)
            w = torch.from_numpy(bits).to(dtype).mul_(2.0 * self.scale).sub_(self.scale)
        else:
            w = torch.from_numpy(regenerate_normal(self.seed, self.index, self.shape)).to(dtype).mul_(self.scale)
        return w.view(self.shape)

    def __repr__(self) -> str:
        return f"FrozenWeights(shape={self.shape}, init={self.init!r}, seed={self.seed}, index={self.index})"


# ----------------------------------------------------------------------------- straight-through functions


def topk_mask(abs_scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Boolean mask (same shape) of the `kept` largest entries of `abs_scores`.

    On CPU this is bits.topk_mask's np.partition (ties to the lower index; a fraction of
    torch.topk's time and transient memory); elsewhere torch.topk.
    """
    flat = abs_scores.detach().reshape(-1)
    n = flat.numel()
    if kept >= n:
        return torch.ones_like(abs_scores, dtype=torch.bool)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_topk_flat(flat.numpy(), int(kept))).view(abs_scores.shape)
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if kept > 0:
        mask[torch.topk(flat, kept, sorted=False).indices] = True
    return mask.view(abs_scores.shape)


def _effective(w: torch.Tensor, mask: torch.Tensor, binarize: bool, constant_magnitude: bool = False) -> torch.Tensor:
    """w_eff from a freshly materialised W (modified in place).

    Binarised: alpha * sign(W) * m with alpha = sum(|W| m) / sum(m). When every |W| is the
    same (signed-constant weights), alpha is that value and alpha * sign(W) is W itself.
    """
    if binarize and not constant_magnitude:
        alpha = w.abs().mul_(mask).sum() / mask.sum().clamp(min=1)
        w = torch.where(w >= 0, alpha, -alpha)
    return w.mul_(mask)


class SupermaskWeight(torch.autograd.Function):
    """w_eff from |scores|: forward top-k mask (and binarisation), backward dL/dw_eff * W.

    Only the FrozenWeights reference is kept for backward; W is re-materialised there.
    """

    @staticmethod
    def forward(ctx, abs_scores: torch.Tensor, frozen: FrozenWeights, kept: int, binarize: bool) -> torch.Tensor:  # noqa: ANN001
        mask = topk_mask(abs_scores, kept)
        w = frozen.tensor(abs_scores.device, abs_scores.dtype)
        ctx.frozen = frozen
        return _effective(w, mask, binarize, frozen.init == "signed_constant")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        w = ctx.frozen.tensor(grad.device, grad.dtype)
        return grad * w, None, None, None


class _SignWeightSTE(torch.autograd.Function):
    """BNN weight binarisation: forward sign (0 -> +1), backward grad * 1{|w| <= 1}."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class _SignActSTE(torch.autograd.Function):
    """MPT 1/1 / Bi-Real activation: forward sign (0 -> +1), backward grad * 2(1 - |x|)+."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * (2.0 * (1.0 - x.abs())).clamp_(min=0.0)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation with the piecewise-quadratic straight-through gradient."""
    return _SignActSTE.apply(x)


class BinaryActivation(nn.Module):
    """sign(x) in {-1, +1} with the 2(1 - |x|) straight-through gradient (MPT 1/1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignActSTE.apply(x)


class SignActivation(nn.Module):
    """Plain inference sign (0 -> +1), exportable to ONNX; what materialize() puts in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x >= 0).to(x.dtype) * 2.0 - 1.0


# ----------------------------------------------------------------------------- supermask layers


class _ConvOps:
    """Conv geometry shared by supermask and binary layers: both run F.conv2d on the layer's
    forward weight and export as a plain bias-free nn.Conv2d of their dense weight."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.forward_weight(), None, self.stride, self.padding)  # type: ignore[attr-defined]

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, bias=False)
        conv.weight.data.copy_(self.dense_weight())  # type: ignore[attr-defined]
        return conv


class _LinearOps:
    """Linear counterpart of _ConvOps."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.forward_weight())  # type: ignore[attr-defined]

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=False)
        lin.weight.data.copy_(self.dense_weight())  # type: ignore[attr-defined]
        return lin


class SupermaskLayer(nn.Module):
    """Common part of SupermaskConv2d / SupermaskLinear: scores, frozen weights, the mask."""

    def __init__(
        self,
        shape: tuple[int, ...],
        prune_ratio: float = 0.8,
        binarize: bool = True,
        seed: int = 0,
        index: int = 0,
        weight_init: str = "signed_constant",
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in shape)
        # the only trained tensor; Kaiming uniform as in the edge-popup / MPT code
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        # plain attribute: not a parameter, not a buffer, not in state_dict
        self.frozen = FrozenWeights(shape, seed, index, weight_init)
        self.prune_ratio = float(prune_ratio)
        self.kept = keep_count(self.frozen.numel, self.prune_ratio)
        self.binarize = bool(binarize)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.frozen.shape

    def effective_weight(self) -> torch.Tensor:
        """w_eff, differentiable w.r.t. the scores (through the straight-through estimator)."""
        return SupermaskWeight.apply(self.scores.abs(), self.frozen, self.kept, self.binarize)

    forward_weight = effective_weight

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """Current boolean mask (top `kept` of |scores|)."""
        return topk_mask(self.scores.abs(), self.kept)

    @torch.no_grad()
    def alpha(self) -> float:
        """Per-layer scale of the binarised weight, sum(|W| * m) / kept (W's scale if not binarised)."""
        if not self.binarize:
            return float(self.frozen.scale)
        m = self.mask()
        w = self.frozen.tensor(m.device)
        return float((w.abs() * m).sum() / m.sum().clamp(min=1))

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """w_eff as a detached tensor (what materialize() copies)."""
        w = self.frozen.tensor(self.scores.device, self.scores.dtype)
        return _effective(w, self.mask(), self.binarize, self.frozen.init == "signed_constant")

    def extra_repr(self) -> str:
        return (
            f"{self.frozen.shape}, prune_ratio={self.prune_ratio} (kept {self.kept}/{self.frozen.numel}), "
            f"binarize={self.binarize}, init={self.frozen.init}, seed={self.frozen.seed}, index={self.frozen.index}"
        )


class SupermaskConv2d(_ConvOps, SupermaskLayer):
    """Conv2d (no bias) whose weight is a mask over frozen random weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        prune_ratio: float = 0.8,
        binarize: bool = True,
        seed: int = 0,
        index: int = 0,
        weight_init: str = "signed_constant",
    ) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), prune_ratio, binarize, seed, index, weight_init)
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.stride, self.padding = int(stride), int(padding)


class SupermaskLinear(_LinearOps, SupermaskLayer):
    """Linear (no bias) whose weight is a mask over frozen random weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        prune_ratio: float = 0.8,
        binarize: bool = True,
        seed: int = 0,
        index: int = 0,
        weight_init: str = "signed_constant",
    ) -> None:
        super().__init__((out_features, in_features), prune_ratio, binarize, seed, index, weight_init)
        self.in_features, self.out_features = int(in_features), int(out_features)


# ----------------------------------------------------------------------------- BNN baseline layers


class BinaryWeightLayer(nn.Module):
    """Latent float weight, used as alpha * sign(w) with alpha = mean|w| (detached).

    Paper 003's BNN baseline: the latent weights are the trained (and transmitted) tensor;
    the straight-through gradient is passed where |w| <= 1. No pruning.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tuple(int(d) for d in shape)))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")

    def binary_weight(self) -> torch.Tensor:
        alpha = self.weight.detach().abs().mean()
        return _SignWeightSTE.apply(self.weight) * alpha

    forward_weight = binary_weight

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        w = self.weight
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()


class BinaryConv2d(_ConvOps, BinaryWeightLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size))
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.stride, self.padding = int(stride), int(padding)


class BinaryLinear(_LinearOps, BinaryWeightLayer):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__((out_features, in_features))
        self.in_features, self.out_features = int(in_features), int(out_features)


# ----------------------------------------------------------------------------- model-level helpers


def supermask_layers(model: nn.Module) -> Iterator[tuple[str, SupermaskLayer]]:
    """(scores state name, layer) for every supermask layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SupermaskLayer):
            yield (f"{name}.scores" if name else "scores"), module


def frozen_weight_count(model: nn.Module) -> int:
    """Number of frozen random weights (= number of scores) of a supermask model."""
    return sum(layer.frozen.numel for _, layer in supermask_layers(model))


def model_masks(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Current masks, keyed like the scores in get_state ('net.0.scores'), as boolean numpy."""
    return OrderedDict((name, layer.mask().cpu().numpy().copy()) for name, layer in supermask_layers(model))


def model_signs(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Signs of the frozen weights (True = +), keyed like model_masks."""
    return OrderedDict((name, layer.frozen.sign_array()) for name, layer in supermask_layers(model))


def mask_bitarrays(model: nn.Module) -> "OrderedDict[str, bitarray]":
    """Current masks as bitarrays (1 bit per weight), keyed like model_masks."""
    return OrderedDict((name, to_bitarray(m)) for name, m in model_masks(model).items())


def layer_alphas(model: nn.Module) -> "OrderedDict[str, float]":
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


def supermask_memory(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model: frozen weights as bits, trained tensors (scores / latent weights), buffers."""
    frozen = sum(layer.frozen.nbytes for _, layer in supermask_layers(model))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "frozen_weight_bytes": frozen,
        "frozen_weights_as_float32_bytes": 4 * frozen_weight_count(model),
        "parameter_bytes": params,
        "buffer_bytes": buffers,
    }


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
    clone._parameters = OrderedDict((k, None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad)) for k, v in module._parameters.items())  # type: ignore[attr-defined]
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
    body = model.net if isinstance(getattr(model, "net", None), nn.Sequential) and getattr(model, "forward_is_net", False) else model
    dense = _convert(body)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        dense = dense.to(ref.device)
    return dense.eval()


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
    "SupermaskWeight",
    "frozen_weight_count",
    "layer_alphas",
    "mask_bitarrays",
    "materialize",
    "model_masks",
    "model_signs",
    "set_scores",
    "set_scores_from_masks",
    "sign_ste",
    "supermask_layers",
    "supermask_memory",
    "topk_mask",
]
