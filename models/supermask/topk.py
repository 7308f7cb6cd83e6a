"""The supermask: the top `kept` |scores| of a layer as a boolean mask.

On the CPU the mask is found without layer-sized float temporaries (a radix select on the
float32 bit patterns for large layers); elsewhere torch.topk. Ties at the threshold go to the
lower index everywhere, so every path gives the same mask bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from ..bits import _topk_flat
from .frozen import CHUNK, SMALL_LAYER


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
