"""The 1-bit model file (``MaskFile``, magic ``FEDGEMPT``): a trained MPT or BNN model as one
bit per weight plus what rebuilds the rest. Torch-free (numpy only), so the hub writes it and
any machine can read and check it; models.mpt_nets turns it back into a torch model. The
layout is in MaskFile's docstring; the bits are packed as models.bits packs them.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .bits import BIT_ORDER, pack_bits, packed_size, unpack_bits
from .errors import ModelFileError

MAGIC = b"FEDGEMPT"
FORMAT_VERSION = 2  # v2 added "bits" ("mask" or "sign"); v1 files (masks only) still load
READABLE_VERSIONS = (1, 2)
BIT_KINDS = ("mask", "sign")


class MaskFileError(ModelFileError):
    """A mask file that is truncated, corrupt or inconsistent; the message says what."""


@dataclass
class LayerInfo:
    """One supermask layer in a mask file. `name` is its scores tensor's state name."""

    name: str
    shape: tuple[int, ...]
    index: int  # layer index that seeds its frozen weights
    kept: int  # weights the mask keeps; every weight for a sign file
    alpha: float  # per-layer scale: effective weight alpha * sign(W) * mask, or alpha * (+-1) from the sign bits

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class MaskFile:
    """A trained 1-bit model: one bit per weight plus what is needed to rebuild the rest.

    ``bits == "mask"`` (MPT): the bits are the supermask; the frozen weights' signs
    regenerate from ``seed``. ``bits == "sign"`` (BNN baseline): the bits are the signs of
    the trained latent weights (1 = w >= 0) and there is no pruning (``kept`` = every weight).
    Either way the effective weight of a layer is ``alpha * (+-1)``, zeroed where masked.

    Layout: MAGIC (8 bytes) | header length (uint32 LE) | header (UTF-8 JSON) |
    payload: all layers' bits packed back to back, MSB first, padded only at the very
    end (``ceil(total weights / 8)`` bytes: 241,544 for Conv-4 on 28x28) |
    extras: float32 little-endian tensors listed in the header (BatchNorm running
    statistics of 1/1 models; empty for 1/32).
    """

    model: str
    variant: str
    prune_ratio: float
    seed: int
    in_shape: tuple[int, ...]
    num_classes: int
    weight_init: str
    layers: list[LayerInfo]
    masks: OrderedDict[str, np.ndarray]  # each layer's bits: its mask, or its weight signs (bits == "sign")
    extras: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    meta: dict = field(default_factory=dict)
    bits: str = "mask"

    # --------------------------------------------------------------- sizes
    @property
    def total_weights(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def mask_payload_bytes(self) -> int:
        return packed_size(self.total_weights)

    # --------------------------------------------------------------- encode / decode
    def mask_payload(self) -> bytes:
        flat = [np.asarray(self.masks[layer.name], dtype=np.bool_).reshape(-1) for layer in self.layers]
        for layer, m in zip(self.layers, flat):
            if m.size != layer.numel:
                raise MaskFileError(f"mask {layer.name!r} has {m.size} entries, the layer has {layer.numel}")
        return pack_bits(np.concatenate(flat) if flat else np.zeros(0, np.bool_))

    def header(self, payload: bytes) -> dict:
        return {
            "format": "fedge-mpt-mask",
            "version": FORMAT_VERSION,
            "bits": self.bits,
            "model": self.model,
            "variant": self.variant,
            "prune_ratio": float(self.prune_ratio),
            "prune_ratio_means": "fraction of weights removed per layer",
            "seed": int(self.seed),
            "in_shape": [int(d) for d in self.in_shape],
            "num_classes": int(self.num_classes),
            "weight_init": self.weight_init,
            "bit_order": BIT_ORDER,
            "layers": [
                {"name": l.name, "shape": list(l.shape), "index": l.index, "kept": l.kept, "alpha": l.alpha}
                for l in self.layers
            ],
            "mask_bytes": len(payload),
            "mask_crc32": zlib.crc32(payload),
            "extras": [[k, [int(d) for d in v.shape]] for k, v in self.extras.items()],
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        payload = self.mask_payload()
        head = json.dumps(self.header(payload), separators=(",", ":"), sort_keys=True).encode()
        extras = b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in self.extras.values())
        return MAGIC + struct.pack("<I", len(head)) + head + payload + extras

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskFile:
        data = bytes(data)
        if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
            raise MaskFileError("not a fedge mask file (bad magic)")
        (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if start + hlen > len(data):
            raise MaskFileError("truncated mask file header")
        try:
            h = json.loads(data[start : start + hlen].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MaskFileError(f"mask file header is not JSON: {exc}") from None
        if h.get("format") != "fedge-mpt-mask" or h.get("version") not in READABLE_VERSIONS:
            raise MaskFileError(f"unsupported mask file format {h.get('format')!r} v{h.get('version')!r}")
        bits = h.get("bits", "mask")
        if bits not in BIT_KINDS:
            raise MaskFileError(f"mask file bits {bits!r}: expected one of {', '.join(BIT_KINDS)}")
        layers = [
            LayerInfo(str(l["name"]), tuple(int(d) for d in l["shape"]), int(l["index"]), int(l["kept"]), float(l["alpha"]))
            for l in h["layers"]
        ]
        pos = start + hlen
        nbytes = int(h["mask_bytes"])
        if nbytes != packed_size(sum(l.numel for l in layers)):
            raise MaskFileError(f"header says {nbytes} mask bytes, the layers need {packed_size(sum(l.numel for l in layers))}")
        payload = data[pos : pos + nbytes]
        if len(payload) != nbytes:
            raise MaskFileError(f"truncated mask payload: {len(payload)} of {nbytes} bytes")
        if zlib.crc32(payload) != int(h["mask_crc32"]):
            raise MaskFileError("mask payload CRC mismatch (corrupt file)")
        pos += nbytes
        masks: OrderedDict[str, np.ndarray] = OrderedDict()
        offset = 0
        for l in layers:
            masks[l.name] = unpack_bits(payload, l.shape, offset_bits=offset)
            offset += l.numel
            if bits == "sign" and l.kept != l.numel:
                raise MaskFileError(f"layer {l.name!r}: a sign file keeps every weight ({l.numel}), header says {l.kept}")
            if bits == "mask" and int(masks[l.name].sum()) != l.kept:
                raise MaskFileError(f"layer {l.name!r}: mask keeps {int(masks[l.name].sum())}, header says {l.kept}")
        extras: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, shape in h.get("extras", []):
            n = int(np.prod(shape, dtype=np.int64))
            chunk = data[pos : pos + 4 * n]
            if len(chunk) != 4 * n:
                raise MaskFileError(f"truncated extra tensor {name!r}")
            extras[name] = np.frombuffer(chunk, dtype="<f4").reshape(shape).astype(np.float32)
            pos += 4 * n
        if pos != len(data):
            raise MaskFileError(f"{len(data) - pos} unexpected trailing bytes")
        return cls(
            model=str(h["model"]),
            variant=str(h["variant"]),
            prune_ratio=float(h["prune_ratio"]),
            seed=int(h["seed"]),
            in_shape=tuple(int(d) for d in h["in_shape"]),
            num_classes=int(h["num_classes"]),
            weight_init=str(h["weight_init"]),
            layers=layers,
            masks=masks,
            extras=extras,
            meta=dict(h.get("meta") or {}),
            bits=bits,
        )

    def save(self, path: str | os.PathLike) -> int:
        """Write the file (atomically, via a temporary name); returns its size in bytes."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return len(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskFile:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())




def load_mask_file(src: str | os.PathLike | bytes | bytearray | io.BufferedIOBase) -> MaskFile:
    """Load from a path, raw bytes or an open binary file."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return MaskFile.from_bytes(bytes(src))
    if hasattr(src, "read"):
        return MaskFile.from_bytes(src.read())  # type: ignore[union-attr]
    return MaskFile.load(src)  # type: ignore[arg-type]


__all__ = [
    "BIT_KINDS",
    "FORMAT_VERSION",
    "LayerInfo",
    "MAGIC",
    "MaskFile",
    "MaskFileError",
    "load_mask_file",
]
