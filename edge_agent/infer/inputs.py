"""Files on the device -> a float32 batch: .npy arrays of any channel count and (with Pillow)
grayscale/RGB images. Raw pixels are normalised per channel (models/normalisation.py)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedge.models.errors import ConfigError
from fedge.models.normalisation import NORMALISATION, normalise

from .predictor import InferenceError

FASHION_MEAN, FASHION_STD = NORMALISATION["fashion-mnist"]  # the default for `fedge agent predict`
Stat = float | Sequence[float]  # one value for every channel, or one per channel
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".webp")


def _normalised(path: Path, pixels: np.ndarray, mean: Stat, std: Stat) -> np.ndarray:
    """A batch of raw pixels [N, C, H, W] normalised per channel; a bad mean/std names the file."""
    try:
        return normalise(pixels, mean, std, channel_axis=1)
    except ConfigError as exc:
        raise InferenceError(f"{path}: {exc}") from None


def _image(path: Path, in_shape: tuple[int, ...], mean: Stat, std: Stat) -> np.ndarray:
    try:
        from PIL import Image  # noqa: PLC0415 - Pillow is optional: only image inputs need it
    except ImportError:
        raise InferenceError(f"{path}: reading images needs Pillow (pip install pillow); or pass .npy arrays") from None
    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise InferenceError(f"{path}: an image file fills a model input of 1 or 3 channels, the model takes "
                             f"{list(in_shape)}; give inputs of other channel counts (e.g. a 6-channel image pair) "
                             f"as .npy arrays [C, H, W] or [N, C, H, W]")
    channels, height, width = in_shape
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return _normalised(path, arr[None], mean, std)[0]


def _array(path: Path, in_shape: tuple[int, ...], mean: Stat, std: Stat) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InferenceError(f"{path}: not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise InferenceError(f"{path}: expected a numeric array")
    if arr.shape == in_shape:
        batch = arr[None]
    elif arr.shape[1:] == in_shape:
        batch = arr
    elif in_shape[0] == 1 and arr.shape[-2:] == in_shape[1:] and arr.ndim in (2, 3):
        batch = arr.reshape(-1, *in_shape)  # [H, W] or [N, H, W] for a 1-channel model
    else:
        raise InferenceError(f"{path}: shape {arr.shape} fits neither {in_shape} nor [N, *{in_shape}]")
    if batch.dtype == np.uint8:  # raw pixels: scale and normalise per channel, like an image
        return _normalised(path, batch, mean, std)
    return batch.astype(np.float32)


def load_inputs(
    paths: Iterable[str | os.PathLike], in_shape: Sequence[int], mean: Stat = FASHION_MEAN, std: Stat = FASHION_STD,
) -> tuple[np.ndarray, list[str]]:
    """Stack inputs into one float32 batch; also returns a label per row ("file" or "file[i]").

    .npy float arrays are taken as already normalised model inputs (one sample or a batch, any
    channel count); .npy uint8 arrays and image files are raw pixels: scaled to [0, 1], then
    (x - mean[c]) / std[c] per channel c (`mean`, `std`: one value for all channels, or one each).
    """
    in_shape = tuple(int(d) for d in in_shape)
    batches, labels = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InferenceError(f"input not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arr = _array(path, in_shape, mean, std)
        elif suffix in IMAGE_SUFFIXES:
            arr = _image(path, in_shape, mean, std)[None]
        else:
            raise InferenceError(f"{path}: unsupported input type {suffix!r}; use .npy or an image ({', '.join(IMAGE_SUFFIXES)})")
        batches.append(arr)
        labels += [str(path)] if len(arr) == 1 else [f"{path}[{i}]" for i in range(len(arr))]
    if not batches:
        raise InferenceError("no inputs given")
    return np.concatenate(batches), labels


