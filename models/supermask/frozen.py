"""The never-trained random weight of a supermask layer, held as 1-bit signs.

W regenerates from (model seed, layer index) (models/bits.py), so it is a plain attribute
of the layer, never a parameter or buffer, and never travels. CHUNK is the piece size the
CPU paths use wherever a layer-sized float temporary can be avoided.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from bitarray import bitarray

from ..bits import (
    BIT_ORDER,
    RELU_GAIN,
    WEIGHT_INITS,
    from_bitarray,
    regenerate_normal,
    regenerate_sign_bits,
    to_bitarray,
    weight_scale,
)
from ..errors import ConfigError

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
