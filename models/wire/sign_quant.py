"""Device-side 1-bit quantisers of an update's change, before the sign1 codec carries it.

The sign1 codec (codecs.py) sends per tensor one scale and one sign per element, and decodes
to +-scale. What the device hands it decides what the hub rebuilds:

- deterministic: the change itself; sign1's scale mean|d| makes scale * sign(d) the closest
  1-bit tensor in L2, but it is biased (every small element moves by the full scale);
- stochastic (unbiased): each element becomes +s with probability (1 + d/s) / 2, else -s,
  with s = max|d| of its tensor, so E[q] = d. Its output is already +-s, which sign1 carries
  exactly (mean|q| = s), so the wire format is unchanged.

With error feedback the device adds what the previous quantisation dropped (its residual,
kept between its participations) before quantising, and keeps the new residual
(d + r - q). Torch-free and seeded (the job seed): the same job gives the same bits anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError

QUANTISERS = ("deterministic", "stochastic")


def stochastic_sign(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """+-s per element (s = max|x|), +s with probability (1 + x/s) / 2: unbiased, float32."""
    flat = np.asarray(x, dtype=np.float64)
    s = float(np.max(np.abs(flat))) if flat.size else 0.0
    if s == 0.0 or not np.isfinite(s):
        return np.zeros(np.shape(x), dtype=np.float32)
    up = rng.random(flat.shape) < (1.0 + flat / s) / 2.0
    scale = np.float32(s)
    return np.where(up, scale, -scale).astype(np.float32)


def quantise_change(change: Mapping[str, np.ndarray], quantiser: str, seed: int,
                    residual: Mapping[str, np.ndarray] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(what the codec sends, the new residual) for a device's change. `residual` (error
    feedback; None: none) is added first; tensors are quantised in their order with one
    generator seeded by `seed`. Deterministic: the change goes as it is (sign1 cuts it)."""
    if quantiser not in QUANTISERS:
        raise ConfigError(f"unknown sign quantiser {quantiser!r}; known: {', '.join(QUANTISERS)}")
    target = {k: np.asarray(v, dtype=np.float32) + (np.asarray(residual[k], dtype=np.float32)
                                                     if residual is not None and k in residual else 0)
              for k, v in change.items()}
    if quantiser == "deterministic":
        sent = {k: _sign1_decoded(v) for k, v in target.items()}
        out = {k: np.asarray(v, np.float32) for k, v in target.items()}
        return out, {k: target[k] - sent[k] for k in target}
    rng = np.random.default_rng([int(seed), 0x5167])
    sent = {k: stochastic_sign(v, rng) for k, v in target.items()}
    return sent, {k: target[k] - sent[k] for k in target}


def _sign1_decoded(x: np.ndarray) -> np.ndarray:
    """What sign1 rebuilds from x: mean|x| * sign (x > 0 is +)."""
    flat = np.asarray(x, dtype=np.float32)
    scale = np.float32(np.mean(np.abs(flat), dtype=np.float64)) if flat.size else np.float32(0.0)
    return np.where(flat > 0, scale, -scale).astype(np.float32)
