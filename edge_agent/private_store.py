"""A device's private tensors (a model's per-device head, registry.split_state): kept between
rounds and, with a file, across agent restarts. They never travel; only this device has them.

The file is an .npz of the tensors plus the model spec they belong to (its JSON form; a plain
name in files from before specs), written atomically (temporary file + rename), so a crash
mid-write leaves the previous head, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.models.errors import ConfigError, DataError
from fedge.models.spec import ModelSpec

log = logging.getLogger("fedge.agent")
_MODEL_KEY = "__model__"


class PrivateStore:
    """This device's private tensors for one model; `path` None: memory only (the simulator)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._model: ModelSpec | None = None
        self._tensors: dict[str, np.ndarray] | None = None
        self._loaded = False

    def load(self, model: ModelSpec | str) -> dict[str, np.ndarray] | None:
        """The private tensors kept for `model`, or None (first round, or kept for another model)."""
        with self._lock:
            if not self._loaded:  # a file that cannot be read fails every round, not just the first
                self._model, self._tensors = _read(self.path) if self.path is not None else (None, None)
                self._loaded = True
            if self._tensors is None or self._model != _spec(model):
                return None
            return {k: v.copy() for k, v in self._tensors.items()}

    def save(self, model: ModelSpec | str, tensors: Mapping[str, np.ndarray]) -> None:
        """Keep `tensors` (after a round) in memory and, with a path, on disk."""
        kept = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
        with self._lock:
            self._model, self._tensors, self._loaded = _spec(model), kept, True
            if self.path is not None:
                _write(self.path, self._model, kept)


def _spec(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(model)


def _read(path: Path) -> tuple[ModelSpec | None, dict[str, np.ndarray] | None]:
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"private state {path}: not a readable .npz written by fedge agent ({exc})") from None
    model = arrays.pop(_MODEL_KEY, None)
    if model is None or model.ndim != 0 or model.dtype.kind != "U":
        raise DataError(f"private state {path}: no {_MODEL_KEY} entry; not written by fedge agent")
    text = str(model)
    try:
        spec = ModelSpec.from_json(json.loads(text) if text.startswith("{") else text)
    except (ValueError, ConfigError):
        raise DataError(f"private state {path}: its {_MODEL_KEY} entry {text!r} is no model spec") from None
    log.info("private tensors of %s loaded from %s (%s)", spec, path, ", ".join(arrays))
    return spec, arrays


def _write(path: Path, model: ModelSpec, tensors: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{_MODEL_KEY: np.array(json.dumps(model.to_json(), sort_keys=True))}, **tensors)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
