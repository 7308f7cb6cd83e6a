"""Datasets as plain numpy arrays: Fashion-MNIST from idx files, MNIST/CIFAR-10 through
torchvision, and generated sets for tests (single images, and 6-channel image pairs). Arrays (not loaders) so a partition can be
held resident by a training worker and sliced without copies.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError  # its home is models.errors; imported from here too
from .normalisation import NORMALISATION, normalise

DEFAULT_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic", "synthetic-pairs")
@dataclass
class Split:
    """One labelled split: x is float32 [N, C, H, W] (normalised), y is int64 [N]."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(len(self.y))

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train.x.shape[1:])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- idx files
def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx1/idx3 file (optionally .gz) into a uint8 array, checking its magic."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    with _open_maybe_gz(path) as fh:
        head = fh.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise DataError(f"{path}: not an unsigned-byte idx file (magic {head!r})")
        ndim = head[3]
        dims = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        data = fh.read()
    expected = int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated, {len(data)} of {expected} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(
        f"missing {stem}(.gz) in {root}. Install Fashion-MNIST with "
        f"'apt-get install dataset-fashion-mnist' or pass --data-root to a folder with the idx files"
    )


def _normalise(images: np.ndarray, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> np.ndarray:
    """uint8 images [N, C, H, W] (any C) -> float32, normalised per channel with `stats`."""
    return normalise(images, *stats, channel_axis=1)


def load_idx_dataset(root: str | os.PathLike, name: str = "fashion-mnist") -> Dataset:
    """MNIST-format idx files (train-images-idx3-ubyte[.gz] etc.) from a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist. For Fashion-MNIST run "
            f"'apt-get install dataset-fashion-mnist' or pass --data-root"
        )
    xs = read_idx(_find(root, "train-images-idx3-ubyte"))
    ys = read_idx(_find(root, "train-labels-idx1-ubyte"))
    xt = read_idx(_find(root, "t10k-images-idx3-ubyte"))
    yt = read_idx(_find(root, "t10k-labels-idx1-ubyte"))
    if len(xs) != len(ys) or len(xt) != len(yt):
        raise DataError(f"{root}: image and label counts differ")
    stats = NORMALISATION["fashion-mnist" if name == "fashion-mnist" else "mnist"]
    return Dataset(
        name=name,
        train=Split(_normalise(xs[:, None], stats), ys.astype(np.int64)),
        test=Split(_normalise(xt[:, None], stats), yt.astype(np.int64)),
        num_classes=10,
    )


# ----------------------------------------------------------------------------- torchvision
def load_torchvision(name: str, root: str | os.PathLike, download: bool = True) -> Dataset:
    """MNIST or CIFAR-10 via torchvision; downloads on a machine with internet access."""
    try:
        from torchvision import datasets  # noqa: PLC0415 - a slow import, needed for mnist/cifar10 only
    except ImportError as exc:
        raise DataError("torchvision is required for mnist/cifar10") from exc
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:  # noqa: BLE001 - torchvision raises many kinds of errors offline
        raise DataError(
            f"could not load {name} from {root}: {exc}. fedge downloads it with torchvision when the "
            f"machine has internet access; otherwise place the torchvision files under {root}"
        ) from None

    def arrays(ds) -> Split:  # noqa: ANN001
        data = np.asarray(ds.data)
        labels = np.asarray(ds.targets, dtype=np.int64)
        if data.ndim == 3:  # MNIST: N,H,W
            x = _normalise(data[:, None], NORMALISATION["mnist"])
        else:  # CIFAR: N,H,W,C
            x = _normalise(np.ascontiguousarray(data.transpose(0, 3, 1, 2)), NORMALISATION["cifar10"])
        return Split(x, labels)

    return Dataset(name=name, train=arrays(train), test=arrays(test), num_classes=10)


# ----------------------------------------------------------------------------- generated
def synthetic(
    n_train: int = 2000, n_test: int = 500, num_classes: int = 10, shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0
) -> Dataset:
    """A learnable generated image set: per-class random prototypes plus noise.

    Used by tests and by users without any dataset; an MLP separates it well after one epoch.
    """
    rng = np.random.default_rng(seed)
    protos = rng.normal(0, 1, size=(num_classes, *shape)).astype(np.float32)

    def make(n: int) -> Split:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = protos[y] * 0.2 + rng.normal(0, 1, size=(n, *shape)).astype(np.float32)
        return Split(x.astype(np.float32), y.astype(np.int64))

    return Dataset(name="synthetic", train=make(n_train), test=make(n_test), num_classes=num_classes)


def synthetic_pairs(
    n_train: int = 2000, n_test: int = 500, num_classes: int = 4, image: tuple[int, int, int] = (3, 16, 16), seed: int = 0,
) -> Dataset:
    """A generated set of image pairs, stacked on the channel axis ([2C, H, W]: 6 channels for two
    RGB images), whose label is the change between the two: `before` holds two random patterns
    of `num_classes` per-class ones, `after` adds the label's pattern, both plus noise. The
    label is what was added, so a model must compare both halves (the `after` image alone shows
    three patterns, not which is new): a test of inputs with any channel count, as in change
    detection on before/after pairs."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0, 1, size=(num_classes, *image)).astype(np.float32)

    def make(n: int) -> Split:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        present = rng.integers(0, num_classes, size=(n, 2))
        noise = rng.normal(0, 0.5, size=(2, n, *image)).astype(np.float32)
        before = patterns[present[:, 0]] + patterns[present[:, 1]] + noise[0]
        after = before + patterns[y] + noise[1]
        return Split(np.concatenate([before, after], axis=1).astype(np.float32), y.astype(np.int64))

    return Dataset(name="synthetic-pairs", train=make(n_train), test=make(n_test), num_classes=num_classes)


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = True, seed: int = 0) -> Dataset:
    """Dispatch by name; every failure is a DataError that says what to install or pass."""
    if name == "fashion-mnist":
        return load_idx_dataset(root or DEFAULT_FASHION_ROOT, "fashion-mnist")
    if name in ("mnist", "cifar10"):
        return load_torchvision(name, root or os.path.expanduser(f"~/.cache/fedge/{name}"), download)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "synthetic-pairs":
        return synthetic_pairs(seed=seed)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
