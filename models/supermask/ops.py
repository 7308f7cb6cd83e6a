"""The autograd functions: straight-through estimators and the rematerialising layer op.

SupermaskWeight: w_eff from |scores| (forward top-k mask and binarisation, backward
dL/dw_eff * W). SupermaskOp: a whole conv/linear step that keeps the mask as packed bits
for backward and rebuilds w_eff from the 1-bit frozen weights, so no float copy of W lives
between the passes. The sign functions are the BNN weight and MPT 1/1 activation STEs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .frozen import FrozenWeights
from .topk import mask_from_scores, topk_mask

if TYPE_CHECKING:
    from .layers import SupermaskLayer


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


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 bit per weight on the CPU (what backward keeps instead of the float w_eff)."""
    if mask.device.type != "cpu":
        return mask
    return torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))


def _unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if packed.dtype == torch.bool:
        return packed
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).view(np.bool_)).view(shape)


def _score_grad_(grad_w: torch.Tensor, scores: torch.Tensor, frozen: FrozenWeights) -> torch.Tensor:
    """grad_w * W * sgn(scores) in place on grad_w, a piece at a time.

    The same products in the same order as SupermaskWeight.backward followed by abs's backward
    (so bit-identical), without layer-sized copies of W or sgn(scores)."""
    g, s = grad_w.view(-1), scores.detach().reshape(-1)
    if g.device.type != "cpu" or g.dtype != torch.float32:
        return grad_w.mul_(frozen.tensor(g.device, g.dtype)).mul_(scores.detach().sgn())
    for start, stop, w in frozen.flat_chunks():
        g[start:stop].mul_(w).mul_(s[start:stop].sgn())
    return grad_w


class SupermaskOp(torch.autograd.Function):
    """A supermask layer's conv/linear in one step: y = op(x, w_eff(scores)), rematerialising.

    Autograd through F.conv2d(x, SupermaskWeight(...)) keeps every layer's float w_eff alive
    from forward to backward. Here backward keeps x, the scores (a parameter, no copy) and the
    mask as packed bits, and rebuilds w_eff from the 1-bit frozen weights when it is needed.
    Gradients are those of the two-step form: grad_x and dL/dw_eff from the same aten
    kernels, and the straight-through score gradient dL/dw_eff * W * sgn(scores).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scores: torch.Tensor, layer: SupermaskLayer) -> torch.Tensor:  # noqa: ANN001
        mask = mask_from_scores(scores, layer.kept)
        y = layer.masked_apply(x, mask, scores)
        ctx.layer = layer
        ctx.save_for_backward(x, scores, _pack_mask(mask))
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN205
        x, scores, packed = ctx.saved_tensors
        layer: SupermaskLayer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            w_eff = layer.weight_from_mask(_unpack_mask(packed, layer.weight_shape), scores)
            grad_x = layer.input_grad(grad_y, x, w_eff)
            del w_eff  # gone before the layer-sized weight gradient is allocated
        grad_w = layer.weight_grad(grad_y, x)
        return grad_x, _score_grad_(grad_w, scores, layer.frozen), None


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
