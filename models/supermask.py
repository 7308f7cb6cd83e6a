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
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from bitarray import bitarray
from torch import nn

from .bits import (
    BIT_ORDER,
    RELU_GAIN,
    WEIGHT_INITS,
    _topk_flat,
    from_bitarray,
    keep_count,
    regenerate_normal,
    regenerate_sign_bits,
    scores_from_keep_prob,
    to_bitarray,
    weight_scale,
)
from .errors import ConfigError

# ----------------------------------------------------------------------------- frozen weights

CHUNK = 1 << 16  # weights per piece when a layer-sized temporary can be avoided (256 KiB of float32)
SMALL_LAYER = 4 * CHUNK  # up to this many weights a layer-sized float temporary (1 MiB) is cheaper than avoiding it


class FrozenWeights:
    """The never-trained random weight of one supermask layer, stored as 1-bit signs.

    ``signed_constant`` (default, the MPT/edge-popup "signed Kaiming constant"):
    ``W = sign(N(0,1)) * gain / sqrt(fan_in)``, gain sqrt(2): the signs bitarray plus one float
    IS the weight. ``kaiming_normal``: ``W ~ N(0, gain^2 / fan_in)``; the signs are cached and
    the magnitudes are regenerated from (seed, index) whenever the float weight is needed.
    """

    def __init__(self, shape: tuple[int, ...], seed: int, index: int, init: str = "signed_constant") -> None:
        if init not in WEIGHT_INITS:
            raise ConfigError(f"unknown weight init {init!r}; known: {WEIGHT_INITS}")
        self.shape = tuple(int(d) for d in shape)
        self.seed = int(seed)
        self.index = int(index)
        self.init = init
        self.scale = weight_scale(self.shape, RELU_GAIN)
        if init == "signed_constant":
            self.signs: bitarray = bitarray(endian=BIT_ORDER)
            self.signs.frombytes(regenerate_sign_bits(self.seed, self.index, self.shape))
            del self.signs[math.prod(self.shape) :]
        else:
            self.signs = to_bitarray(regenerate_normal(self.seed, self.index, self.shape) >= 0)

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

    def flat_chunks(self, rows: int = CHUNK) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, W.flat[start:stop]) in pieces of `rows` weights, CPU float32.

        For the backward pass: multiplying the score gradient by W a piece at a time keeps the
        transient float copy of W at one piece instead of the whole layer."""
        if self.init != "signed_constant":
            w = self._materialise(torch.float32).reshape(-1)
            yield 0, self.numel, w
            return
        for start in range(0, self.numel, rows):
            stop = min(start + rows, self.numel)
            yield start, stop, self.piece(start, stop)

    def piece(self, start: int, stop: int) -> torch.Tensor:
        """W.flat[start:stop] as float32 (signed-constant weights only; the same values as tensor())."""
        packed = np.frombuffer(memoryview(self.signs), dtype=np.uint8)[start // 8 : (stop + 7) // 8]
        bits = np.unpackbits(packed)[start % 8 : start % 8 + stop - start]
        return torch.from_numpy(bits).to(torch.float32).mul_(2.0 * self.scale).sub_(self.scale)

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


def mask_from_scores(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """topk_mask(scores.abs(), kept), bit for bit, without layer-sized float temporaries on the CPU.

    The threshold (k-th largest |score|) comes from a radix select over the float32 bit
    patterns for large layers (small layers and float64: np.partition of one |s| copy; the
    radix passes cost ~1 ms however small the layer); the mask then compares the scores themselves
    (|s| > t  <=>  s > t or s < -t), so no |scores| tensor is made. Ties at the threshold go to
    the lower index, as in topk_mask.
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or kept <= 0 or kept >= n:
        return topk_mask(scores.detach().abs(), kept)
    s = flat.numpy()
    if s.dtype == np.float32 and n > SMALL_LAYER:
        threshold = _kth_largest_abs(s, kept)
    else:  # a small layer's |s| copy is at most 1 MiB, and partition is ~10x faster than the radix passes
        a = np.abs(s)
        a.partition(n - kept)
        threshold = a[n - kept]
        del a
    mask = np.greater(s, threshold)
    for start in range(0, n, CHUNK):  # |s| > t also where s < -t, without a layer-sized temporary
        piece = mask[start : start + CHUNK]
        np.logical_or(piece, s[start : start + CHUNK] < -threshold, out=piece)
    need = kept - int(np.count_nonzero(mask))
    if need > 0:
        mask[_ties(s, threshold, need)[:need]] = True
    if int(np.count_nonzero(mask)) != kept:
        raise ValueError("scores contain NaN; cannot rank them")
    return torch.from_numpy(mask).view(scores.shape)


def _kth_largest_abs(s: np.ndarray, k: int) -> np.float32:
    """The k-th largest |s| of a float32 array: np.partition(|s|, n - k)[n - k], NaN ranked
    highest as there, by a two-pass radix select on the bit patterns read in pieces (no float
    copy of the layer). |x|'s bits order like |x| itself: sign bit cleared, then unsigned."""
    bits = s.view(np.uint32)
    hist = np.zeros(1 << 15, dtype=np.int64)
    for start in range(0, bits.size, CHUNK):
        hist += np.bincount((bits[start : start + CHUNK] & 0x7FFFFFFF) >> 16, minlength=1 << 15)
    high, k = _bin_from_top(hist, k)
    hist = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, bits.size, CHUNK):
        piece = bits[start : start + CHUNK] & 0x7FFFFFFF
        hist += np.bincount(piece[(piece >> 16) == high] & 0xFFFF, minlength=1 << 16)
    low, _ = _bin_from_top(hist, k)
    return np.array([(high << 16) | low], dtype=np.uint32).view(np.float32)[0]


def _bin_from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest item, its rank inside that bin counted from the top)."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))
    return hist.size - 1 - i, k - (int(from_top[i - 1]) if i else 0)


def _ties(s: np.ndarray, threshold: float, need: int) -> np.ndarray:
    """The first `need` indices with |s| == threshold, scanned in pieces (no float copy of s)."""
    found: list[np.ndarray] = []
    for start in range(0, s.size, CHUNK):
        piece = s[start : start + CHUNK]
        found.append(np.flatnonzero((piece == threshold) | (piece == -threshold)) + start)
        need -= found[-1].size
        if need <= 0:
            break
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


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
        """Current boolean mask (top `kept` of |scores|)."""
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


# ----------------------------------------------------------------------------- model-level helpers


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
    "layer_alphas",
    "mask_from_scores",
    "materialize",
    "model_masks",
    "set_scores",
    "set_scores_from_masks",
    "supermask_layers",
    "topk_mask",
]
