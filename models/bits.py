"""1-bit storage for supermask models, torch-free (numpy + bitarray).

What lives here:

* bit packing of boolean arrays (masks, weight signs) to bytes / `bitarray` and back,
  bit-exact. Bit order is MSB first ("big", numpy's and bitarray's default): element i of
  the C-order flattened array is bit ``7 - i % 8`` of byte ``i // 8``; the last byte is
  zero-padded.
* the frozen random weights of a supermask layer, as a pure function of (model seed,
  layer index, shape): ``regenerate_signs`` / ``regenerate_normal``. Hub, devices and an
  inference-only client with no torch all get the same weights from the same seed.
* ``keep_count``: how many weights a layer keeps at a given prune ratio. fedge's
  ``prune_ratio`` is the fraction REMOVED (0.8 keeps 20 %); the MPT / edge-popup code's
  ``prune_rate`` / ``k`` is the fraction KEPT.
* helpers for mask-based aggregation ("mpt-mask"): the top-k mask of a score array, the
  weighted average of masks (keep probabilities) and scores derived from it.

The 1-bit model file built from these bits is models.maskfile. Importing this module imports no
torch, so the hub and a torch-less device can use it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
from bitarray import bitarray

from .errors import ConfigError

BIT_ORDER = "big"
SCORES_SUFFIX = ".scores"

# ----------------------------------------------------------------------------- prune ratio


def keep_count(numel: int, prune_ratio: float) -> int:
    """Number of weights kept out of `numel` when a fraction `prune_ratio` is removed.

    removed = floor(prune_ratio * numel) (with a 1e-7 guard against float error, so 0.29*100
    removes 29, not 28); kept = numel - removed. This is the MPT / edge-popup rule
    ``j = int((1 - k) * numel)`` pruned, with their k = 1 - prune_ratio. At 0.8 a layer keeps
    ceil(0.2 * numel) weights, i.e. 20 % rounded up.
    """
    numel = int(numel)
    p = float(prune_ratio)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"prune_ratio must be in [0, 1) (fraction of weights removed), got {prune_ratio!r}")
    removed = int(math.floor(p * numel + 1e-7))
    return numel - min(removed, numel)


# ----------------------------------------------------------------------------- packing


def packed_size(numel: int) -> int:
    """Bytes needed for `numel` bits."""
    return (int(numel) + 7) // 8


def pack_bits(arr: np.ndarray) -> bytes:
    """Boolean (or 0/1) array -> bytes, C order, MSB first, last byte zero-padded."""
    flat = np.ascontiguousarray(np.asarray(arr)).reshape(-1)
    if flat.dtype != np.bool_:
        if not np.all((flat == 0) | (flat == 1)):
            raise ValueError("pack_bits takes a boolean or 0/1 array")
        flat = flat.astype(np.bool_)
    return np.packbits(flat, bitorder=BIT_ORDER).tobytes()


def unpack_bits(data: bytes | bytearray | memoryview, shape: Sequence[int] | int, offset_bits: int = 0) -> np.ndarray:
    """Bytes -> boolean array of `shape`, reading `prod(shape)` bits from bit `offset_bits`."""
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.frombuffer(data, dtype=np.uint8)
    if offset_bits % 8 == 0:
        start = offset_bits // 8
        if start + packed_size(n) > len(buf):
            raise ValueError(f"need {packed_size(n)} bytes at byte {start}, buffer has {len(buf)}")
        bits = np.unpackbits(buf[start : start + packed_size(n)], count=n, bitorder=BIT_ORDER)
    else:
        end = offset_bits + n
        if packed_size(end) > len(buf):
            raise ValueError(f"need {packed_size(end)} bytes, buffer has {len(buf)}")
        bits = np.unpackbits(buf[: packed_size(end)], count=end, bitorder=BIT_ORDER)[offset_bits:]
    return bits.astype(np.bool_).reshape(shape)


def to_bitarray(arr: np.ndarray) -> bitarray:
    """Boolean array -> bitarray (same bit order as pack_bits), length = arr.size."""
    flat = np.asarray(arr).reshape(-1)
    out = bitarray(endian=BIT_ORDER)
    out.frombytes(pack_bits(flat))
    del out[flat.size :]
    return out


def from_bitarray(bits: bitarray, shape: Sequence[int] | int) -> np.ndarray:
    """bitarray -> boolean array of `shape` (bit-exact inverse of to_bitarray)."""
    if bits.endian != BIT_ORDER:
        raise ValueError(f"expected a {BIT_ORDER}-endian bitarray")
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if len(bits) != n:
        raise ValueError(f"bitarray has {len(bits)} bits, shape {shape} needs {n}")
    # a bitarray exposes its buffer (pad bits at the end are ignored by count=n)
    return np.unpackbits(np.frombuffer(memoryview(bits), dtype=np.uint8), count=n, bitorder=BIT_ORDER).astype(
        np.bool_
    ).reshape(shape)


# ----------------------------------------------------------------------------- frozen weights

WEIGHT_INITS = ("signed_constant", "kaiming_normal")
RELU_GAIN = math.sqrt(2.0)


def fan_in(shape: Sequence[int]) -> int:
    """torch's fan_in for a Linear [out, in] or Conv [out, in, kh, kw] weight."""
    shape = tuple(int(d) for d in shape)
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else int(shape[0])


def weight_scale(shape: Sequence[int], gain: float = RELU_GAIN) -> float:
    """gain / sqrt(fan_in): the magnitude of a signed-constant weight, the std of a Kaiming one."""
    return float(gain / math.sqrt(fan_in(shape)))


def _seed_sequence(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x6D7074])  # 'mpt'


def regenerate_signs(seed: int, index: int, shape: Sequence[int]) -> np.ndarray:
    """Signs (True = +1, False = -1) of the signed-constant weights of layer `index`.

    The bits are the raw output of PCG64 seeded with SeedSequence([seed, index, 'mpt']), taken
    as little-endian uint64 words and unpacked MSB first per byte. numpy guarantees the bit
    generators' and SeedSequence's streams across versions, so the weights never change; the
    distribution is exactly that of sign(N(0, 1)).
    """
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    words = np.random.PCG64(_seed_sequence(seed, index)).random_raw((n + 63) // 64)
    raw = np.asarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, count=n, bitorder=BIT_ORDER).astype(np.bool_).reshape(shape)


def regenerate_sign_bits(seed: int, index: int, shape: Sequence[int]) -> bytes:
    """regenerate_signs already packed (pack_bits of it, pad bits zero): the PCG64 words ARE the
    packed bits, so no one-byte-per-weight array is made (what a device builds at start-up)."""
    n = int(np.prod(tuple(int(d) for d in shape), dtype=np.int64))
    words = np.random.PCG64(_seed_sequence(seed, index)).random_raw((n + 63) // 64)
    raw = np.asarray(words, dtype="<u8").view(np.uint8)[: packed_size(n)]
    if n % 8:
        raw[-1] &= np.uint8((0xFF << (8 - n % 8)) & 0xFF)
    return raw.tobytes()


def regenerate_normal(seed: int, index: int, shape: Sequence[int]) -> np.ndarray:
    """Standard normal draw (float32) for a 'kaiming_normal' layer; scale by weight_scale(shape).

    Uses numpy's Generator.standard_normal on the same seed sequence; stable in practice but
    numpy only guarantees the raw bit streams, so prefer 'signed_constant' (the default) for
    models that must reload bit-exactly years later.
    """
    shape = tuple(int(d) for d in shape)
    rng = np.random.Generator(np.random.PCG64(_seed_sequence(seed, index)))
    return rng.standard_normal(int(np.prod(shape, dtype=np.int64)), dtype=np.float32).reshape(shape)


def frozen_weight(seed: int, index: int, shape: Sequence[int], init: str = "signed_constant") -> np.ndarray:
    """The frozen weight W of supermask layer `index` as float32, the values
    supermask.FrozenWeights.tensor() gives (a torch-free device materialises MPT models with it).

    signed_constant: +-weight_scale(shape) by regenerate_signs; kaiming_normal: regenerate_normal
    times weight_scale(shape), both in float32 as torch computes them."""
    if init not in WEIGHT_INITS:
        raise ConfigError(f"unknown weight init {init!r}; known: {WEIGHT_INITS}")
    shape = tuple(int(d) for d in shape)
    scale = np.float32(weight_scale(shape, RELU_GAIN))
    if init == "signed_constant":
        return np.where(regenerate_signs(seed, index, shape), scale, -scale).astype(np.float32)
    return regenerate_normal(seed, index, shape) * scale



# ----------------------------------------------------------------------------- masks from scores


def topk_mask(scores: np.ndarray, kept: int) -> np.ndarray:
    """Boolean mask of the `kept` largest |scores|; ties at the threshold go to the lower index.

    np.partition based: O(n) time and one float copy of the layer, where torch.topk on CPU
    needs about five (values and int64 indices).
    """
    shape = np.shape(scores)
    a = np.abs(np.asarray(scores)).reshape(-1)
    return _topk_flat(a, int(kept)).reshape(shape)


def _topk_flat(a: np.ndarray, kept: int) -> np.ndarray:
    """Mask of the `kept` largest entries of the 1-D array `a` (not modified)."""
    n = a.size
    if kept >= n:
        return np.ones(n, dtype=np.bool_)
    if kept <= 0:
        return np.zeros(n, dtype=np.bool_)
    threshold = np.partition(a, n - kept)[n - kept]
    mask = a > threshold
    need = kept - int(np.count_nonzero(mask))
    if need > 0:
        mask[np.flatnonzero(a == threshold)[:need]] = True
    if int(np.count_nonzero(mask)) != kept:
        raise ValueError("scores contain NaN; cannot rank them")
    return mask



def keep_probability(
    masks: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | None = None
) -> OrderedDict[str, np.ndarray]:
    """Weighted average of several devices' masks: per weight, the probability it is kept."""
    if not masks:
        raise ValueError("keep_probability needs at least one mask set")
    w = np.ones(len(masks)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(masks) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be one non-negative number per mask set, not all zero")
    w = w / w.sum()
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name in masks[0]:
        acc = np.zeros(np.shape(masks[0][name]), dtype=np.float64)
        for m, wi in zip(masks, w):
            acc += np.asarray(m[name], dtype=np.float64) * wi
        out[name] = acc.astype(np.float32)
    return out


def scores_from_keep_prob(
    keep_prob: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray] | None = None,
    scale: float | None = None,
    tie_eps: float = 1e-3,
) -> OrderedDict[str, np.ndarray]:
    """Next global scores from keep probabilities (for a mask-averaging 'mpt-mask' strategy).

    score = scale * (p + tie_eps * r), where r in [0, 1) is the rank of |previous score| within
    the layer (0 when no previous scores are given), so the top-k of the new scores is the
    set of most-often-kept weights, with ties between equal p broken by the old scores.
    `scale` defaults to 1/sqrt(fan_in) per layer, the size of a fresh Kaiming-uniform score,
    so local training moves the new scores as fast as it moved fresh ones.
    """
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, p in keep_prob.items():
        p = np.asarray(p, dtype=np.float64)
        r = np.zeros(p.size)
        if previous is not None and name in previous:
            prev = np.abs(np.asarray(previous[name], dtype=np.float64)).reshape(-1)
            r[np.argsort(prev, kind="stable")] = np.arange(p.size) / max(1, p.size)
        s = scale if scale is not None else 1.0 / math.sqrt(max(1, fan_in(p.shape)))
        out[name] = (s * (p.reshape(-1) + tie_eps * r)).reshape(p.shape).astype(np.float32)
    return out


__all__ = [
    "BIT_ORDER",
    "WEIGHT_INITS",
    "fan_in",
    "from_bitarray",
    "frozen_weight",
    "keep_count",
    "keep_probability",
    "pack_bits",
    "packed_size",
    "regenerate_normal",
    "regenerate_sign_bits",
    "regenerate_signs",
    "scores_from_keep_prob",
    "to_bitarray",
    "topk_mask",
    "unpack_bits",
    "weight_scale",
]
