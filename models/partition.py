"""Seeded splits of a labelled set over devices: iid, dominant label, shards, Dirichlet, sizes.

Each partitioner returns one index array per device; no index is used twice. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

PARTITIONERS = ("iid", "dominant", "shards", "dirichlet", "sizes")


class PartitionError(ConfigError):
    """The requested split does not fit the data (too few images of some class, ...)."""


@dataclass
class PartitionSpec:
    """How to split. Fields used depend on `kind` (see docs/recipes.md)."""

    kind: str = "iid"
    # iid/dominant: images per device (default: all data evenly; dominant: at most what its labels allow)
    per_device: int | None = None
    dominant_fraction: float = 0.55  # dominant: share of the device's own class
    classes_per_device: int = 2  # shards
    images_per_class: int = 20  # shards
    alpha: float = 0.5  # dirichlet
    sizes: list[int] = field(default_factory=list)  # sizes: explicit images per device


def _by_class(y: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[list[int]]:
    pools = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        pools.append(list(idx))
    return pools


def _take(pools: list[list[int]], c: int, n: int, device: int) -> list[int]:
    if len(pools[c]) < n:
        raise PartitionError(f"device {device} needs {n} images of class {c} but only {len(pools[c])} are left")
    taken, pools[c] = pools[c][:n], pools[c][n:]
    return taken


def _dominant_counts(per: int, fraction: float, k: int) -> tuple[int, int]:
    """Images of a device's own label and of each other label, for `per` images per device."""
    n_dom = int(round(per * fraction))
    return n_dom, (per - n_dom) // max(1, k - 1)


def _dominant_shortfall(counts: np.ndarray, devices: int, per: int, fraction: float) -> tuple[int, int] | None:
    """(class, images needed) of the first class the dominant split over `devices` x `per` runs
    out of, or None if it fits: device d takes its own label d mod k and a share of all others."""
    k = len(counts)
    n_dom, n_other = _dominant_counts(per, fraction, k)
    for c in range(k):
        owners = len(range(c, devices, k))  # devices whose own label is c
        need = owners * n_dom + (devices - owners) * n_other
        if need > counts[c]:
            return c, need
    return None


def _largest_dominant_size(counts: np.ndarray, devices: int, fraction: float) -> int:
    """The most images per device the dominant split can give: the whole set over the devices
    when that fits (10 devices on Fashion-MNIST: 6000 each), else less (3 devices: 9230 each,
    since each device's own label has only 6000 images), never 0."""
    lo, hi = 1, max(1, int(counts.sum()) // devices)
    if _dominant_shortfall(counts, devices, hi, fraction) is None:
        return hi
    while lo < hi:  # the need grows with the size: bisect for the largest size that fits
        mid = (lo + hi + 1) // 2
        if _dominant_shortfall(counts, devices, mid, fraction) is None:
            lo = mid
        else:
            hi = mid - 1
    return lo


def partition(
    y: np.ndarray, num_devices: int, spec: PartitionSpec, seed: int = 0, num_classes: int | None = None
) -> list[np.ndarray]:
    """Split label vector `y` over `num_devices` devices according to `spec`."""
    if num_devices < 1:
        raise PartitionError("num_devices must be at least 1")
    y = np.asarray(y)
    kind = spec.kind
    if y.ndim > 1 and kind not in ("iid", "sizes"):
        raise PartitionError(f"partition {kind!r} splits by class label, but the targets are one array of shape "
                             f"{tuple(y.shape[1:])} per example (masks); use iid or sizes")
    k = int(num_classes or (int(y.max()) + 1 if len(y) else 0))
    rng = np.random.default_rng(seed)
    if kind == "iid":
        per = spec.per_device or len(y) // num_devices
        if per * num_devices > len(y):
            raise PartitionError(f"iid: {num_devices} x {per} images exceeds the {len(y)} available")
        perm = rng.permutation(len(y))
        parts = [perm[i * per : (i + 1) * per] for i in range(num_devices)]
    elif kind == "dominant":
        counts = np.bincount(y, minlength=k)[:k] if len(y) else np.zeros(k, dtype=np.int64)
        per = spec.per_device or _largest_dominant_size(counts, num_devices, spec.dominant_fraction)
        short = _dominant_shortfall(counts, num_devices, per, spec.dominant_fraction)
        if short is not None:
            fits = _largest_dominant_size(counts, num_devices, spec.dominant_fraction)
            advice = (f"use --per-device {fits} or less (without --per-device the largest size that fits is taken), "
                      "or --partition iid or dirichlet"
                      if _dominant_shortfall(counts, num_devices, fits, spec.dominant_fraction) is None
                      else "too few images of that label for this many devices: use --partition iid or dirichlet")
            raise PartitionError(f"dominant: {num_devices} devices x {per} images, {spec.dominant_fraction:.0%} of each "
                                 f"device's own label, need {short[1]} images of class {short[0]} but the data has "
                                 f"{int(counts[short[0]])}; {advice}")
        n_dom, n_other = _dominant_counts(per, spec.dominant_fraction, k)
        pools = _by_class(y, k, rng)
        parts = []
        for d in range(num_devices):
            dom = d % k
            idx = _take(pools, dom, n_dom, d)
            for c in range(k):
                if c != dom:
                    idx += _take(pools, c, n_other, d)
            parts.append(np.array(idx))
    elif kind == "shards":
        pools = _by_class(y, k, rng)
        if spec.classes_per_device > k:
            raise PartitionError(f"shards: {spec.classes_per_device} classes per device but the data has {k}")
        parts = []
        for d in range(num_devices):
            # consecutive class pairs cycle through all classes so every class is used evenly
            classes = [(d * spec.classes_per_device + j) % k for j in range(spec.classes_per_device)]
            idx: list[int] = []
            for c in classes:
                idx += _take(pools, c, spec.images_per_class, d)
            parts.append(np.array(idx))
    elif kind == "dirichlet":
        if spec.alpha <= 0:
            raise PartitionError("dirichlet: alpha must be positive")
        buckets: list[list[int]] = [[] for _ in range(num_devices)]
        for pool in _by_class(y, k, rng):
            shares = rng.dirichlet([spec.alpha] * num_devices)
            cuts = (np.cumsum(shares)[:-1] * len(pool)).astype(int)
            for d, chunk in enumerate(np.split(np.array(pool, dtype=np.int64), cuts)):
                buckets[d] += chunk.tolist()
        parts = [np.array(b, dtype=np.int64) for b in buckets]
    elif kind == "sizes":
        if len(spec.sizes) != num_devices:
            raise PartitionError(f"sizes: {len(spec.sizes)} sizes given for {num_devices} devices")
        if sum(spec.sizes) > len(y) or min(spec.sizes) < 1:
            raise PartitionError(f"sizes: total {sum(spec.sizes)} must be positive per device and <= {len(y)}")
        perm = rng.permutation(len(y))
        ends = np.cumsum(spec.sizes)
        parts = [perm[e - s : e] for s, e in zip(spec.sizes, ends)]
    else:
        raise PartitionError(f"unknown partition {kind!r}; choose one of {', '.join(PARTITIONERS)}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_counts(y: np.ndarray, num_classes: int) -> list[int]:
    """How many examples of each class labels `y` hold. Targets with one array per example
    (segmentation masks) have no class: for them [examples whose mask has no positive value,
    examples with at least one], so the counts always add up to the examples."""
    y = np.asarray(y)
    if y.ndim > 1:
        positive = (y.reshape(len(y), -1) > 0.5).any(axis=1)
        return [int((~positive).sum()), int(positive.sum())]
    return np.bincount(y, minlength=num_classes).astype(int).tolist()


def class_counts(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per device, how many images of each class it holds (the partition report; `label_counts`)."""
    return [label_counts(np.asarray(y)[p], num_classes) for p in parts]
