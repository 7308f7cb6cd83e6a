"""Input preprocessing constants and the one function that applies them, in a module of their own
so that the torch-free predictor on a device normalises exactly as training did without
importing the data loaders.

Statistics are per channel: a dataset lists one mean and one std per channel of its inputs, or a
single value that holds for every channel (the data sets below). So inputs of any channel count,
e.g. a pair of RGB images stacked into 6 channels, normalise the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (means, stds): one per channel, or one for all

# dataset -> (mean, std) applied to pixel/255 (docs/protocol.md §6.1: a device written from the
# docs must preprocess exactly like this, the wire does not carry it)
NORMALISATION: dict[str, Stats] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4734,), (0.2516,)),
}


def channel_stats(mean: float | Sequence[float], std: float | Sequence[float], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 arrays of `channels` values: a single value holds for every channel;
    otherwise there must be exactly one per channel. Every std must be positive."""
    out = []
    for what, value in (("mean", mean), ("std", std)):
        arr = np.atleast_1d(np.asarray(value, dtype=np.float32))
        if arr.ndim != 1 or len(arr) not in (1, channels):
            raise ConfigError(f"normalisation {what} has {arr.size} values for inputs of {channels} channel(s); "
                              f"give one value for all channels or one per channel")
        if not np.isfinite(arr).all() or (what == "std" and (arr <= 0).any()):
            raise ConfigError(f"normalisation {what} must be finite{' and positive' if what == 'std' else ''}, got "
                              f"{arr.tolist()}")
        out.append(np.broadcast_to(arr, (channels,)).astype(np.float32))
    return out[0], out[1]


def normalise(pixels: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float],
              channel_axis: int = 1) -> np.ndarray:
    """float32 `(pixels / 255 - mean[c]) / std[c]` for every channel c on `channel_axis` (any count)."""
    x = np.asarray(pixels).astype(np.float32) / np.float32(255.0)
    axis = channel_axis % max(1, x.ndim)
    channels = x.shape[axis] if x.ndim else 1
    m, s = channel_stats(mean, std, channels)
    shape = [1] * x.ndim
    if x.ndim:
        shape[axis] = channels
    return ((x - m.reshape(shape)) / s.reshape(shape)).astype(np.float32)
