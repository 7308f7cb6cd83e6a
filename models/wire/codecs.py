"""Codecs between a named set of tensors (numpy arrays) and an envelope body.

The header carries the manifest (`codec` plus `tensors`: a list of [name, shape]); the body
is the tensors' elements concatenated in manifest order, row-major, little-endian.
Torch-free: both the hub and a torch-less device import this.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from .envelope import EnvelopeError

Tensors = "OrderedDict[str, np.ndarray]"

# codec name -> numpy dtype of one element on the wire
CODECS: dict[str, np.dtype] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
}
# 1-bit codec for supermasks: each tensor's elements (nonzero = 1) packed 8 per byte, most
# significant bit first, each tensor padded to a whole byte. Decodes to float32 0/1.
MASK_CODEC = "mask1"
# 1-bit codec for update deltas (strategy sign-delta): per tensor one little-endian float32
# scale (>= 0) followed by the signs (1 = positive) packed as in mask1. Decodes to
# float32 +-scale: a 1-bit-per-weight uplink that still says which way every score moved.
SIGN_CODEC = "sign1"
# Block-quantised model codecs q8, q6, q4: each tensor cut into blocks of Q8_BLOCK elements
# (the last may be short); per tensor first every block's float32 offset (its min) and float32
# scale ((max - min) / (2^bits - 1)), then one code of `bits` bits per element: q8 one uint8 per
# element, q6 and q4 the codes as one bit stream (most significant bit first, the tensor's
# stream padded with zero bits to a whole byte). Decodes to float32 offset + scale * code, the
# same bits on every receiver. Per block, not per tensor, so one outlier coarsens only its block.
Q8_CODEC = "q8"
Q8_BLOCK = 256
QUANT_BITS: dict[str, int] = {Q8_CODEC: 8, "q6": 6, "q4": 4}
# Entropy-coded masks (strategy fedpm): the mask bits range-coded (constriction's queue
# RangeEncoder, Bernoulli model) with a per-weight keep-probability p that sender and receiver
# both hold: sigmoid of the global scores the device trained from (`keep_probs`). Body: the
# CRC-32 of the mask1 packing of the same bits (little-endian uint32), then the coder's 32-bit
# words (little-endian). Costs about the masks' cross-entropy under p: well below one bit per
# weight once p polarises. Decoding needs the same p (`model_probs`): with other
# probabilities the bits come out wrong and the CRC says so.
MASK_RC_CODEC = "maskrc"
# Baseline: the mask1 body compressed with zstandard (level 19); needs no probabilities.
MASK_ZSTD_CODEC = "mask1z"
ALL_CODECS = (*CODECS, MASK_CODEC, SIGN_CODEC, *QUANT_BITS, MASK_RC_CODEC, MASK_ZSTD_CODEC)
# codecs whose encoder and decoder need the keep-probabilities of the model the update was trained from
CONTEXT_CODECS = frozenset({MASK_RC_CODEC})
P_FLOOR = 2.0**-12  # p is clipped to [P_FLOOR, 1 - P_FLOOR]: a bit against the model costs at most ~12 bits
# what an update holds under each codec (any other codec: the device's trained state). The
# codec in a round's task is all a device needs to know what to send, and all the hub needs
# to know that an update in another codec means something else and must be refused.
UPDATE_CARRIES: dict[str, str] = {MASK_CODEC: "mask", SIGN_CODEC: "sign", MASK_RC_CODEC: "mask",
                                   MASK_ZSTD_CODEC: "mask"}
# codecs a model envelope may use: a model's tensors are values, which the 1-bit codecs cannot carry
MODEL_CODECS = (*CODECS, *QUANT_BITS)


def _bits_len(n: int) -> int:
    return (n + 7) // 8


def manifest_of(tensors: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """The [name, shape] list that tells a receiver how to cut the body."""
    return [[name, [int(d) for d in np.shape(arr)]] for name, arr in tensors.items()]


def keep_probs(scores: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The probability model of codec maskrc: sigmoid(score) per weight in float64, clipped to
    [P_FLOOR, 1 - P_FLOOR]. Both sides compute it from the same float32 scores (the global
    model of the update's base version) with this one function."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, arr in scores.items():
        s = np.clip(np.asarray(arr, dtype=np.float32).astype(np.float64), -64.0, 64.0)  # exp stays finite
        out[name] = np.clip(1.0 / (1.0 + np.exp(-s)), P_FLOOR, 1.0 - P_FLOOR)
    return out


def _mask1_body(tensors: Mapping[str, np.ndarray]) -> bytes:
    return b"".join(np.packbits(np.asarray(arr).reshape(-1) != 0, bitorder="big").tobytes() for arr in tensors.values())


def _flat_probs(entries: list[tuple[str, tuple[int, ...]]], model_probs: Mapping[str, np.ndarray] | None,
                error: type[Exception]) -> np.ndarray:
    """The probabilities for the manifest's tensors, concatenated; `error` names what does not fit."""
    if model_probs is None:
        raise error(f"codec {MASK_RC_CODEC} needs the keep-probabilities of the model the update was trained from")
    parts = []
    for name, shape in entries:
        p = model_probs.get(name)
        if p is None or tuple(np.shape(p)) != tuple(shape):
            raise error(f"codec {MASK_RC_CODEC}: no keep-probabilities of shape {list(shape)} for tensor {name!r}")
        parts.append(np.asarray(p, dtype=np.float64).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def _encode_rc(tensors: Mapping[str, np.ndarray], model_probs: Mapping[str, np.ndarray] | None) -> bytes:
    import constriction  # type: ignore[import-untyped]  # noqa: PLC0415 - only this codec's users need it

    entries = [(name, tuple(np.shape(arr))) for name, arr in tensors.items()]
    p = _flat_probs(entries, model_probs, ConfigError)
    bits = np.concatenate([(np.asarray(a).reshape(-1) != 0) for a in tensors.values()]) if tensors else np.zeros(0, bool)
    encoder = constriction.stream.queue.RangeEncoder()
    if bits.size:
        encoder.encode(bits.astype(np.int32), constriction.stream.model.Bernoulli(perfect=False), p)
    crc = zlib.crc32(_mask1_body(tensors))
    words: np.ndarray = np.asarray(encoder.get_compressed(), dtype="<u4")
    return np.array([crc], dtype="<u4").tobytes() + words.tobytes()


def _decode_rc(entries: list[tuple[str, tuple[int, ...]]], sizes: list[int], body: bytes,
               model_probs: Mapping[str, np.ndarray] | None) -> OrderedDict[str, np.ndarray]:
    import constriction  # noqa: PLC0415

    p = _flat_probs(entries, model_probs, EnvelopeError)
    if len(body) < 4 or len(body) % 4:
        raise EnvelopeError(f"codec {MASK_RC_CODEC}: body of {len(body)} bytes is not a CRC and whole 32-bit words")
    crc = int(np.frombuffer(body, dtype="<u4", count=1)[0])
    words = np.frombuffer(body, dtype="<u4", offset=4).astype(np.uint32)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        bits = (decoder.decode(constriction.stream.model.Bernoulli(perfect=False), p) if p.size
                else np.zeros(0, np.int32))
    except BaseException as exc:  # constriction raises AssertionError / ValueError on invalid data
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise EnvelopeError(f"codec {MASK_RC_CODEC}: the body does not decode ({exc})") from None
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for (name, shape), size in zip(entries, sizes):
        if name in out:
            raise EnvelopeError(f"tensor {name!r} appears twice in the manifest")
        out[name] = np.asarray(bits[offset : offset + size], dtype=np.float32).reshape(shape)
        offset += size
    if zlib.crc32(_mask1_body(out)) != crc:
        raise EnvelopeError(f"codec {MASK_RC_CODEC}: decoded masks fail their CRC (decoded with other keep-probabilities "
                            "than they were coded with: a wrong base model version, or a corrupt body)")
    if _encode_rc(out, model_probs) != body:  # one body per mask: no trailing or padded words
        raise EnvelopeError(f"codec {MASK_RC_CODEC}: the body is not the canonical coding of its masks "
                            f"({len(body)} bytes)")
    return out


def encode_tensors(tensors: Mapping[str, np.ndarray], codec: str = "fp32",
                   model_probs: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, Any], bytes]:
    """Return (header fields, body) for the tensors under the chosen codec. `model_probs`
    (codec maskrc only: keep_probs of the global the update was trained from) is the
    per-weight probability model, keyed and shaped like `tensors`."""
    if codec == MASK_CODEC:
        return {"codec": codec, "tensors": manifest_of(tensors)}, _mask1_body(tensors)
    if codec == MASK_ZSTD_CODEC:
        import zstandard  # noqa: PLC0415

        return {"codec": codec, "tensors": manifest_of(tensors)}, zstandard.ZstdCompressor(level=19).compress(
            _mask1_body(tensors))
    if codec == MASK_RC_CODEC:
        return {"codec": codec, "tensors": manifest_of(tensors)}, _encode_rc(tensors, model_probs)
    if codec == SIGN_CODEC:
        return {"codec": codec, "tensors": manifest_of(tensors)}, b"".join(_sign_part(arr) for arr in tensors.values())
    if codec in QUANT_BITS:
        bits = QUANT_BITS[codec]
        return {"codec": codec, "tensors": manifest_of(tensors)}, b"".join(_quant_part(arr, codec, bits)
                                                                            for arr in tensors.values())
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; known: {sorted(ALL_CODECS)}")
    dtype = CODECS[codec]
    parts = [np.ascontiguousarray(np.asarray(arr), dtype=dtype).tobytes() for arr in tensors.values()]
    return {"codec": codec, "tensors": manifest_of(tensors)}, b"".join(parts)


def _sign_part(arr: np.ndarray) -> bytes:
    """Scale = mean |x|: the value that makes scale * sign(x) closest to x in L2."""
    flat = np.asarray(arr, dtype=np.float32).reshape(-1)
    scale = np.float32(np.mean(np.abs(flat), dtype=np.float64)) if flat.size else np.float32(0.0)
    return np.array([scale], dtype="<f4").tobytes() + np.packbits(flat > 0, bitorder="big").tobytes()


def _code_bytes(size: int, bits: int) -> int:
    return -(-size * bits // 8)


def _quant_part(arr: np.ndarray, codec: str, bits: int) -> bytes:
    """Round to nearest (ties to even): deterministic, so the hub can predict what devices decode."""
    flat = np.asarray(arr, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ConfigError(f"codec {codec} cannot carry NaN or Inf")
    levels = (1 << bits) - 1
    pad = -flat.size % Q8_BLOCK
    blocks = np.pad(flat, (0, pad), mode="edge").reshape(-1, Q8_BLOCK) if flat.size else flat.reshape(0, Q8_BLOCK)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    scale = ((hi.astype(np.float64) - lo) / levels).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[:, None]
    codes = np.clip(np.rint((blocks - lo[:, None]) / safe), 0, levels).astype(np.uint8).reshape(-1)[: flat.size]
    head: bytes = np.stack([lo, scale], axis=1).astype("<f4").tobytes()
    if bits == 8:
        return head + bytes(codes.tobytes())
    stream = np.unpackbits(codes[:, None], axis=1, bitorder="big")[:, 8 - bits:].reshape(-1)
    return head + bytes(np.packbits(stream, bitorder="big").tobytes())


def _codes(body: bytes, offset: int, size: int, bits: int) -> np.ndarray:
    """`size` codes of `bits` bits from body[offset:], as float32."""
    if bits == 8:
        return np.frombuffer(body, dtype=np.uint8, count=size, offset=offset).astype(np.float32)
    raw = np.frombuffer(body, dtype=np.uint8, count=_code_bytes(size, bits), offset=offset)
    stream = np.unpackbits(raw, bitorder="big")[: size * bits].reshape(size, bits)
    padded = np.zeros((size, 8), dtype=np.uint8)  # each code left-padded to a byte
    padded[:, 8 - bits:] = stream
    return np.packbits(padded, axis=1, bitorder="big").reshape(-1).astype(np.float32)


def _decode_quant(entries: list[tuple[str, tuple[int, ...]]], sizes: list[int], body: bytes, codec: str
                  ) -> OrderedDict[str, np.ndarray]:
    bits = QUANT_BITS[codec]
    nblocks = [-(-n // Q8_BLOCK) for n in sizes]
    expected = sum(8 * b + _code_bytes(n, bits) for b, n in zip(nblocks, sizes))
    if expected != len(body):
        raise EnvelopeError(f"body has {len(body)} bytes but the manifest needs {expected} for codec {codec}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for (name, shape), size, nb in zip(entries, sizes, nblocks):
        if name in out:
            raise EnvelopeError(f"tensor {name!r} appears twice in the manifest")
        pairs = np.frombuffer(body, dtype="<f4", count=2 * nb, offset=offset).reshape(nb, 2)
        if not np.all(np.isfinite(pairs)) or np.any(pairs[:, 1] < 0):
            raise EnvelopeError(f"tensor {name!r} has a {codec} offset or scale that is not finite, or a scale < 0")
        codes = _codes(body, offset + 8 * nb, size, bits)
        idx = np.arange(size) // Q8_BLOCK
        out[name] = (pairs[idx, 0] + pairs[idx, 1] * codes).astype(np.float32).reshape(shape)
        offset += 8 * nb + _code_bytes(size, bits)
    return out


def _check_manifest(manifest: object) -> list[tuple[str, tuple[int, ...]]]:
    if not isinstance(manifest, list):
        raise EnvelopeError("header field 'tensors' must be a list of [name, shape]")
    out = []
    for entry in manifest:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in entry[1])
        ):
            raise EnvelopeError(f"bad tensor manifest entry {entry!r}")
        out.append((entry[0], tuple(entry[1])))
    return out


def decode_tensors(header: Mapping[str, Any], body: bytes,
                   model_probs: Mapping[str, np.ndarray] | None = None) -> OrderedDict[str, np.ndarray]:
    """Cut the body into named float32 arrays; EnvelopeError if it does not add up. Codec
    maskrc needs `model_probs`, the keep-probabilities it was encoded with (encode_tensors)."""
    codec = header.get("codec")
    if codec not in ALL_CODECS:
        raise EnvelopeError(f"unknown codec {codec!r}; known: {sorted(ALL_CODECS)}")
    entries = _check_manifest(header.get("tensors"))
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in entries]
    if codec == MASK_RC_CODEC:
        return _decode_rc(entries, sizes, body, model_probs)
    if codec == MASK_ZSTD_CODEC:
        body = _unzstd(body, sum(_bits_len(n) for n in sizes))
        codec = MASK_CODEC
    if codec in (MASK_CODEC, SIGN_CODEC):
        return _decode_packed(entries, sizes, body, codec)
    if codec in QUANT_BITS:
        return _decode_quant(entries, sizes, body, codec)
    dtype = CODECS[codec]
    expected = sum(sizes) * dtype.itemsize
    if expected != len(body):
        raise EnvelopeError(f"body has {len(body)} bytes but the manifest needs {expected} for codec {codec}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for (name, shape), size in zip(entries, sizes):
        if name in out:
            raise EnvelopeError(f"tensor {name!r} appears twice in the manifest")
        arr = np.frombuffer(body, dtype=dtype, count=size, offset=offset).reshape(shape)
        out[name] = arr.astype(np.float32)
        offset += size * dtype.itemsize
    return out


def _unzstd(body: bytes, expected: int) -> bytes:
    """The mask1 body inside a mask1z body; at most `expected` bytes are ever produced."""
    import zstandard  # noqa: PLC0415

    try:
        out = zstandard.ZstdDecompressor().decompress(body, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise EnvelopeError(f"codec {MASK_ZSTD_CODEC}: the body does not decompress ({exc})") from None
    return out


def _decode_packed(entries: list[tuple[str, tuple[int, ...]]], sizes: list[int], body: bytes, codec: str
                   ) -> OrderedDict[str, np.ndarray]:
    """mask1 and sign1: per tensor [sign1: a float32 scale] then its bits packed 8 per byte.
    mask1 decodes to 0/1, sign1 to -scale/+scale."""
    head = 4 if codec == SIGN_CODEC else 0
    expected = sum(head + _bits_len(n) for n in sizes)
    if expected != len(body):
        raise EnvelopeError(f"body has {len(body)} bytes but the manifest needs {expected} for codec {codec}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    raw = np.frombuffer(body, dtype=np.uint8)
    for (name, shape), size in zip(entries, sizes):
        if name in out:
            raise EnvelopeError(f"tensor {name!r} appears twice in the manifest")
        nbytes = _bits_len(size)
        bits = np.unpackbits(raw[offset + head : offset + head + nbytes], count=size, bitorder="big").reshape(shape)
        if head:
            scale = float(np.frombuffer(body, dtype="<f4", count=1, offset=offset)[0])
            if not np.isfinite(scale) or scale < 0:
                raise EnvelopeError(f"tensor {name!r} has sign-codec scale {scale!r}; it must be finite and >= 0")
            out[name] = np.where(bits == 1, scale, -scale).astype(np.float32)
        else:
            out[name] = bits.astype(np.float32)
        offset += head + nbytes
    return out


def check_against(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Reject tensors whose names, shapes or values do not fit the reference model."""
    if list(tensors) != list(reference):
        missing = [k for k in reference if k not in tensors]
        extra = [k for k in tensors if k not in reference]
        raise EnvelopeError(f"tensor names do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, arr in tensors.items():
        if tuple(arr.shape) != tuple(reference[name].shape):
            raise EnvelopeError(
                f"tensor {name!r} has shape {tuple(arr.shape)}, the model has {tuple(reference[name].shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise EnvelopeError(f"tensor {name!r} contains NaN or Inf")
