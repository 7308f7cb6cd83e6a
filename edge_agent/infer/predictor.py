"""One ONNX Runtime session with predict/logits helpers: what a device runs, without torch."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from fedge.models.errors import ConfigError, DataError
from fedge.models.spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import onnx


class InferenceError(DataError):
    """An input or model the predictor cannot use; the text says what is wrong."""


def _fedge_metadata(props: dict[str, str]) -> dict[str, Any]:
    """fedge.* metadata of a session (same as onnx_graph.get_metadata, without importing onnx)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith("fedge."):
            try:
                out[key[6:]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[6:]] = value
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow warnings for large |x|."""
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


#: The model families the predictor reads (models/families.py, which needs torch, defines them).
FAMILIES = ("classification", "segmentation")


@dataclass
class Prediction:
    """What a model says about a batch, by family.

    classification: `classes` int64 [N] (argmax over axis 1), `probabilities` softmax [N, classes];
    segmentation: `mask` bool, the logits' shape [N, 1, H, W] (logit > 0, i.e. probability > 0.5),
    `probabilities` the per-pixel sigmoid; `classes` is None there."""

    logits: np.ndarray  # float32
    probabilities: np.ndarray  # float32, the logits' shape
    classes: np.ndarray | None = None  # classification: int64 [N]
    mask: np.ndarray | None = None  # segmentation: bool, the logits' shape
    family: str = "classification"

    @property
    def confidence(self) -> np.ndarray:
        """Per sample: the chosen class's probability, or the mean over pixels of the chosen side's."""
        if self.classes is not None:
            return self.probabilities[np.arange(len(self.classes)), self.classes]
        p = self.probabilities.reshape(len(self.probabilities), -1)
        return np.maximum(p, 1.0 - p).mean(axis=1)

    @property
    def positive_fraction(self) -> np.ndarray:
        """Segmentation: per sample, the share of pixels in the mask."""
        if self.mask is None:
            raise AttributeError("positive_fraction is a segmentation result; this is a classification")
        return self.mask.reshape(len(self.mask), -1).mean(axis=1)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Sequential execution on `threads` intra-op threads (1 = what a small device should use)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class Predictor:
    """An ONNX Runtime session for a fedge model: input [batch, *in_shape] -> logits [batch, classes, ...];
    its family (ONNX metadata fedge.family, classification when absent) decides what predict() returns."""

    def __init__(self, session: ort.InferenceSession, info: dict[str, Any] | None = None) -> None:
        self.session = session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise InferenceError(f"model has {len(inputs)} inputs; a fedge model has exactly one")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        meta = _fedge_metadata(session.get_modelmeta().custom_metadata_map)
        self.info: dict[str, Any] = {**meta, **(info or {})}
        dims = list(inputs[0].shape)[1:]
        if dims and all(isinstance(d, int) for d in dims):
            self.in_shape: tuple[int, ...] = tuple(int(d) for d in dims)
        elif isinstance(self.info.get("in_shape"), list):
            self.in_shape = tuple(int(d) for d in self.info["in_shape"])
        else:
            raise InferenceError(f"cannot tell the model's input shape from {inputs[0].shape}")
        out_dims = list(outputs[0].shape)  # [batch, classes] or [batch, classes, H, W]
        known = len(out_dims) > 1 and isinstance(out_dims[1], int)
        self.num_classes = int(out_dims[1]) if known else self.info.get("num_classes")
        self.family = str(self.info.get("family", "classification"))
        if self.family not in FAMILIES:
            raise InferenceError(f"model family {self.family!r} is not one the predictor knows ({', '.join(FAMILIES)})")
        self.info.setdefault("family", self.family)
        self.info.setdefault("in_shape", list(self.in_shape))
        if self.num_classes is not None:
            self.info.setdefault("num_classes", int(self.num_classes))

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, model_bytes: bytes, threads: int = 1, info: dict[str, Any] | None = None) -> Predictor:
        sess = ort.InferenceSession(model_bytes, session_options(threads), providers=["CPUExecutionProvider"])
        return cls(sess, info)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, threads: int = 1, info: dict[str, Any] | None = None) -> Predictor:
        return cls.from_bytes(proto.SerializeToString(), threads, info)

    @classmethod
    def from_envelope(
        cls, payload: bytes, threads: int = 1, verifier: Any = None, templates: str | os.PathLike | None = None,
    ) -> Predictor:
        """A fedge model envelope: its model's graph template is filled with its tensors (torch-free;
        MPT scores and BNN latent weights are materialised first). With `verifier`
        (models.wire.keys.hub_verifier) the hub's signature is required; `templates` is a folder
        of graph templates (default: the shipped ones, models/onnx_templates/)."""
        from fedge.models import onnx_graph  # noqa: PLC0415 - onnx is only needed for envelopes

        proto, _msg = onnx_graph.from_envelope(payload, verifier=verifier, templates=templates)
        return cls.from_proto(proto, threads)

    @classmethod
    def load(
        cls, path: str | os.PathLike, threads: int = 1, verifier: Any = None, templates: str | os.PathLike | None = None,
    ) -> Predictor:
        """An .onnx file, or a .fedge model envelope (e.g. runs/<id>/final_model.fedge)."""
        path = Path(path)
        if not path.is_file():
            raise InferenceError(f"model file not found: {path}")
        with path.open("rb") as f:
            head = f.read(4)
        if head == b"FEDG":
            return cls.from_envelope(path.read_bytes(), threads, verifier=verifier, templates=templates)
        try:
            sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base
            raise InferenceError(f"{path}: not an ONNX model onnxruntime can load (neither .onnx nor a .fedge model "
                                 f"message): {str(exc).splitlines()[0][:300]}") from None
        return cls(sess, {"file": str(path)})

    # -- inference ---------------------------------------------------------------------
    def as_batch(self, x: Any) -> np.ndarray:
        """One sample shaped like in_shape, or a batch [N, *in_shape], as contiguous float32."""
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape == self.in_shape:
            arr = arr[None]
        elif arr.shape[1:] != self.in_shape:
            if self.in_shape[0] == 1 and arr.shape[-2:] == self.in_shape[1:] and arr.ndim in (2, 3):
                arr = arr.reshape(-1, *self.in_shape)  # [H, W] or [N, H, W] for a 1-channel model
            else:
                raise InferenceError(f"input shape {arr.shape} fits neither {self.in_shape} nor [N, *{self.in_shape}]")
        return np.ascontiguousarray(arr)

    def logits(self, x: Any, batch_size: int = 256) -> np.ndarray:
        batch = self.as_batch(x)
        if len(batch) <= batch_size:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        parts = [self.session.run([self.output_name], {self.input_name: batch[i : i + batch_size]})[0]
                 for i in range(0, len(batch), batch_size)]
        return np.concatenate(parts)

    def predict(self, x: Any, batch_size: int = 256) -> Prediction:
        """Classes and softmax (classification) or the per-pixel mask and sigmoid (segmentation)."""
        logits = self.logits(x, batch_size).astype(np.float32, copy=False)
        if self.family == "segmentation":
            return Prediction(logits=logits, probabilities=sigmoid(logits), mask=logits > 0, family=self.family)
        return Prediction(logits=logits, probabilities=softmax(logits), classes=logits.argmax(axis=1), family=self.family)

    @property
    def spec(self) -> ModelSpec | None:
        """The served model as a spec (metadata `model` and `model_options`); None for an .onnx
        file that names no model (or names it unreadably)."""
        options = self.info.get("model_options", {})
        if not isinstance(self.info.get("model"), str) or not isinstance(options, dict):
            return None
        try:
            return ModelSpec(self.info["model"], options)
        except ConfigError:
            return None

    def describe(self) -> dict[str, Any]:
        """What GET /model answers: the model (its registered name and `model_options`, the
        options its spec sets off their defaults), where it came from and its input and output."""
        keys = ("model", "model_options", "family", "run", "version", "fleet", "in_shape", "num_classes", "builder",
                "quantized", "file")
        return {k: self.info[k] for k in keys if k in self.info}


