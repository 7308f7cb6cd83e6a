"""The modules: supermask conv/linear layers, the BNN baseline layers and binary activations.

A supermask layer trains only its scores; its weight is a mask over FrozenWeights. A BNN
layer trains latent float weights used as alpha * sign(w). Both share the conv/linear
geometry mixins and export as plain bias-free nn.Conv2d / nn.Linear (to_dense).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..bits import keep_count
from .fedpm import SAMPLE, sampled_forward
from .frozen import CHUNK, FrozenWeights
from .ops import SupermaskOp, SupermaskWeight, _effective, _SignActSTE, _SignWeightSTE
from .topk import mask_from_scores


class BinaryActivation(nn.Module):
    """sign(x) in {-1, +1} with the 2(1 - |x|) straight-through gradient (MPT 1/1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignActSTE.apply(x)


class SignActivation(nn.Module):
    """Plain inference sign (0 -> +1), exportable to ONNX; what materialize() puts in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x >= 0).to(x.dtype) * 2.0 - 1.0


# ----------------------------------------------------------------------------- supermask layers


class _WeightOps:
    """The forward shared by the conv and linear mixins: a supermask layer that trains runs as
    one SupermaskOp (rematerialising); otherwise op(x, forward weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self, SupermaskLayer) and torch.is_grad_enabled() and self.scores.requires_grad:
            if self.mask_rule == SAMPLE:
                return sampled_forward(self, x)
            return SupermaskOp.apply(x, self.scores, self)
        return self.apply_weight(x, self.forward_weight())  # type: ignore[attr-defined]


class _ConvOps(_WeightOps):
    """Conv geometry shared by supermask and binary layers: both run F.conv2d on the layer's
    forward weight and export as a plain bias-free nn.Conv2d of their dense weight."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding)

    def input_grad(self, grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """dL/dx of apply_weight, from aten's convolution_backward (what autograd calls)."""
        return self._conv_backward(grad_y, x, w, [True, False, False])[0]

    def weight_grad(self, grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dL/dw; the kernel reads only the weight's shape (as torch.nn.grad.conv2d_weight)."""
        w = grad_y.new_empty(1).expand(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        # a channels-last input (e.g. images reshaped from N x 28 x 28) gives a channels-last
        # gradient; the score gradient is formed on its flat view, so make it contiguous
        # (conv layers are small: at most 147,456 weights in Conv-4)
        return self._conv_backward(grad_y, x, w, [False, True, False])[1].contiguous()

    def _conv_backward(self, grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, which: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(
            grad_y, x, w, None, [self.stride] * 2, [self.padding] * 2, [1, 1], False, [0, 0], 1, which
        )

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, bias=False)
        conv.weight.data.copy_(self.dense_weight())  # type: ignore[attr-defined]
        return conv


class _LinearOps(_WeightOps):
    """Linear counterpart of _ConvOps."""

    in_features: int
    out_features: int

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def input_grad(self, grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """dL/dx of F.linear without bias (grad_y @ W, as autograd computes it)."""
        return grad_y.matmul(w)

    def weight_grad(self, grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dL/dw = grad_y^T @ x over all leading dimensions."""
        return grad_y.reshape(-1, grad_y.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=False)
        lin.weight.data.copy_(self.dense_weight())  # type: ignore[attr-defined]
        return lin


class SupermaskLayer(nn.Module):
    """Common part of SupermaskConv2d / SupermaskLinear: scores, frozen weights, the mask.

    `mask_rule`: "topk" (MPT: the top `kept` |scores|) or "sample" (FedPM, fedpm.py: trains
    on masks drawn from sigmoid(scores) and evaluates with sigmoid(scores) > 0.5)."""

    mask_rule: str = "topk"
    sampler: torch.Generator | None = None  # FedPM's mask draws (fedpm.seed_sampling); None: torch's global RNG

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
        """w_eff, differentiable w.r.t. the scores (through the straight-through estimator);
        a FedPM layer's deterministic w_eff (not differentiable: it trains in sampled_forward)."""
        if self.mask_rule == SAMPLE:
            return self.dense_weight()
        return SupermaskWeight.apply(self.scores.abs(), self.frozen, self.kept, self.binarize)

    forward_weight = effective_weight

    def _lean(self, like: torch.Tensor) -> bool:
        """Signed-constant float32 weights on the CPU: w_eff = W * m, built a piece at a time."""
        return self.frozen.init == "signed_constant" and like.device.type == "cpu" and like.dtype == torch.float32

    def masked_apply(self, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """op(x, w_eff) for SupermaskOp's forward (w_eff dropped right after)."""
        return self.apply_weight(x, self.weight_from_mask(mask, scores))

    @torch.no_grad()
    def weight_from_mask(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """w_eff for a given mask, freshly materialised (SupermaskOp calls it in forward and backward).

        The lean path computes W * m piece by piece (the same products as _effective's
        w.mul_(mask), so the same numbers) without a layer-sized float copy of W beside w_eff."""
        if not self._lean(like):
            w = self.frozen.tensor(like.device, like.dtype)
            return _effective(w, mask, self.binarize, self.frozen.init == "signed_constant")
        w = torch.empty(self.frozen.numel, dtype=torch.float32)
        flat_mask = mask.reshape(-1)
        for start, stop, chunk in self.frozen.flat_chunks():
            torch.mul(chunk, flat_mask[start:stop], out=w[start:stop])
        return w.view(self.weight_shape)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """Current boolean mask (top `kept` of |scores|; a FedPM layer's sigmoid(scores) > 0.5)."""
        if self.mask_rule == SAMPLE:
            return self.scores.detach() > 0
        return mask_from_scores(self.scores, self.kept)

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

    def masked_apply(self, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """A large layer's forward in blocks of output rows: w_eff exists one block at a time.

        Each output is still one dot product over all inputs, so the numbers match the
        unblocked F.linear (bit for bit on the benchmark machine; the tests allow 1e-6)."""
        rows = max(16, 1 << max(0, (4 * CHUNK // self.in_features).bit_length() - 1))
        if not self._lean(scores) or rows >= self.out_features:
            return super().masked_apply(x, mask, scores)
        flat_mask, blocks = mask.reshape(-1), []
        for r0 in range(0, self.out_features, rows):
            a, b = r0 * self.in_features, min(r0 + rows, self.out_features) * self.in_features
            blocks.append(F.linear(x, self.frozen.piece(a, b).mul_(flat_mask[a:b]).view(-1, self.in_features)))
        return torch.cat(blocks, dim=-1)


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
