"""Partitioners: exact per-device counts, no image used twice, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.models.partition import PartitionError, PartitionSpec, class_counts, partition


def _labels(per_class: int = 6000, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def _disjoint(parts):
    allidx = np.concatenate(parts)
    return len(allidx) == len(np.unique(allidx))


def test_dominant_matches_paper001_on_fashion_mnist_sizes():
    y = _labels()
    parts = partition(y, 10, PartitionSpec("dominant", per_device=6000, dominant_fraction=0.55), seed=3)
    counts = class_counts(y, parts, 10)
    for d, row in enumerate(counts):
        assert row[d] == 3300
        assert all(row[c] == 300 for c in range(10) if c != d)
    assert _disjoint(parts)


def test_shards_give_c_classes_times_n_images():
    y = _labels(per_class=400)
    parts = partition(y, 100, PartitionSpec("shards", classes_per_device=2, images_per_class=20), seed=0)
    counts = class_counts(y, parts, 10)
    assert sum(map(sum, counts)) == 4000
    for row in counts:
        assert sorted(c for c in row if c) == [20, 20]
    assert _disjoint(parts)


def test_iid_dirichlet_and_sizes():
    y = _labels(per_class=100)
    iid = partition(y, 4, PartitionSpec("iid"), seed=1)
    assert [len(p) for p in iid] == [250] * 4 and _disjoint(iid)
    dirichlet = partition(y, 5, PartitionSpec("dirichlet", alpha=0.1), seed=1)
    assert sum(len(p) for p in dirichlet) == 1000 and _disjoint(dirichlet)
    skew = np.array(class_counts(y, dirichlet, 10))
    assert skew.max(axis=0).mean() > 50  # small alpha concentrates each class on few devices (iid: 20)
    sizes = partition(y, 3, PartitionSpec("sizes", sizes=[140, 500, 220]), seed=1)
    assert [len(p) for p in sizes] == [140, 500, 220] and _disjoint(sizes)


def test_partitions_are_reproducible_by_seed():
    y = _labels(per_class=200)
    spec = PartitionSpec("dirichlet", alpha=0.5)
    a, b, c = (partition(y, 6, spec, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_impossible_splits_say_why():
    y = _labels(per_class=100)
    with pytest.raises(PartitionError, match="need 1000 images of class 0 but the data has 100; use --per-device 100 or"):
        partition(y, 10, PartitionSpec("dominant", per_device=1000), seed=0)
    with pytest.raises(PartitionError, match="3 sizes given for 2 devices"):
        partition(y, 2, PartitionSpec("sizes", sizes=[1, 2, 3]))
    with pytest.raises(PartitionError, match="unknown partition"):
        partition(y, 2, PartitionSpec("alphabetical"))


def test_dominant_default_fits_few_devices():
    """Fewer devices than labels (the README's 3 Pis): without --per-device the split takes the
    largest size the labels allow instead of failing (each device's own label has only 6000)."""
    y = _labels()
    for devices in (1, 3, 5):
        parts = partition(y, devices, PartitionSpec("dominant"), seed=0)
        counts = class_counts(y, parts, 10)
        assert _disjoint(parts) and len(parts) == devices
        for d, row in enumerate(counts):
            assert row[d] == max(row) and row[d] / sum(row) == pytest.approx(0.55, abs=0.01)
        assert max(c[0] for c in counts) <= 6000
    assert [len(p) for p in partition(y, 3, PartitionSpec("dominant"), seed=0)] == [9227] * 3
    assert [len(p) for p in partition(y, 10, PartitionSpec("dominant"), seed=0)] == [6000] * 10  # paper 001: unchanged
    with pytest.raises(PartitionError, match="too few images of that label for this many devices"):
        partition(y[:30], 40, PartitionSpec("dominant"))
