"""Wire tensors -> ONNX model, without torch.

A device that only serves predictions receives the global model as a fedge envelope of
kind "model" (the same message the trainers get: tensors named like the torch state_dict,
header field "model" the registry name, meta "in_shape" and "num_classes"). This module
rebuilds the network's ONNX graph from those numpy tensors with `onnx.helper`, so the
device needs numpy, onnx and onnxruntime but never torch, and the wire format stays single
(no second "ONNX" message kind for the hub to publish and version).

The graphs mirror models/nets.py exactly (same layer order, padding, pooling and
flattening), and tests/test_onnx.py checks them against torch. Only architectures with a
builder below can be rebuilt; any other model must be exported with `fedge export` on a
machine with torch and shipped as an .onnx file.

Must stay torch-free: import nothing from models.registry, models.nets, models.data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedge.models.wire.envelope import DEFAULT_MAX_BYTES, decode
from fedge.models.wire.messages import parse_model

from .errors import ModelFileError

# opset 17 / IR 8: understood by every onnxruntime since 1.13 (late 2022), so an older
# runtime on a device can still load what a newer hub or exporter produces.
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_PREFIX = "fedge."


class GraphError(ModelFileError):
    """Tensors that do not describe a model this module can rebuild; the text says why."""


# ----------------------------------------------------------------------------- helpers
def _tensor(tensors: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    if name not in tensors:
        raise GraphError(f"tensor {name!r} is missing (got {sorted(tensors)[:8]})")
    arr = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
    if arr.ndim != ndim:
        raise GraphError(f"tensor {name!r} has shape {arr.shape}, expected {ndim} dimensions")
    if not np.all(np.isfinite(arr)):
        raise GraphError(f"tensor {name!r} contains NaN or Inf")
    return arr


def _check_names(tensors: Mapping[str, np.ndarray], expected: list[str], model: str) -> None:
    extra = sorted(set(tensors) - set(expected))
    missing = [n for n in expected if n not in tensors]
    if extra or missing:
        raise GraphError(f"{model}: tensor names do not match (missing {missing[:4]}, unexpected {extra[:4]})")


class _Graph:
    """Tiny builder: nodes, initializers and unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name=name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}", **attrs))
        return out


def _linear(g: _Graph, x: str, weight: str, bias: str | None, out: str | None = None) -> str:
    # torch Linear stores W as [out, in]: y = x @ W^T + b  ==  Gemm(x, W, b, transB=1)
    inputs = [x, weight] + ([bias] if bias else [])
    return g.op("Gemm", inputs, out, transB=1)


# ----------------------------------------------------------------------------- builders
def _build_mlp(g: _Graph, tensors: Mapping[str, np.ndarray], in_shape: tuple[int, ...], num_classes: int) -> None:
    """models.nets.MLP: Flatten, Linear, ReLU, Linear, ReLU, Linear (net.1/3/5)."""
    names = [f"net.{i}.{k}" for i in (1, 3, 5) for k in ("weight", "bias")]
    _check_names(tensors, names, "mlp")
    n_in = int(np.prod(in_shape))
    x = g.op("Flatten", [INPUT_NAME], axis=1)
    prev = n_in
    for i, layer in enumerate((1, 3, 5)):
        w = _tensor(tensors, f"net.{layer}.weight", 2)
        b = _tensor(tensors, f"net.{layer}.bias", 1)
        if w.shape[1] != prev or b.shape != (w.shape[0],):
            raise GraphError(f"mlp: net.{layer} has weight {w.shape} / bias {b.shape}; expected {prev} inputs")
        prev = w.shape[0]
        last = i == 2
        x = _linear(g, x, g.init(f"net.{layer}.weight", w), g.init(f"net.{layer}.bias", b), OUTPUT_NAME if last else None)
        if not last:
            x = g.op("Relu", [x])
    if prev != num_classes:
        raise GraphError(f"mlp: last layer has {prev} outputs but num_classes is {num_classes}")


def _build_conv4(g: _Graph, tensors: Mapping[str, np.ndarray], in_shape: tuple[int, ...], num_classes: int) -> None:
    """models.nets.Conv4: 4 bias-free 3x3 convs (pad 1) with 2 max-pools, 3 bias-free linears."""
    convs = [f"features.{i}.weight" for i in (0, 2, 5, 7)]
    fcs = [f"classifier.{i}.weight" for i in (1, 3, 5)]
    _check_names(tensors, convs + fcs, "conv4")
    if len(in_shape) != 3:
        raise GraphError(f"conv4 needs in_shape (C, H, W), got {tuple(in_shape)}")
    channels, height, width = (int(d) for d in in_shape)
    x = INPUT_NAME
    prev = channels
    for i, name in enumerate(convs):
        w = _tensor(tensors, name, 4)
        if w.shape[1] != prev or w.shape[2:] != (3, 3):
            raise GraphError(f"conv4: {name} has shape {w.shape}; expected [*, {prev}, 3, 3]")
        prev = w.shape[0]
        x = g.op("Conv", [x, g.init(name, w)], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        x = g.op("Relu", [x])
        if i in (1, 3):
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    flat = prev * (height // 4) * (width // 4)
    x = g.op("Flatten", [x], axis=1)
    for i, name in enumerate(fcs):
        w = _tensor(tensors, name, 2)
        if w.shape[1] != flat:
            raise GraphError(f"conv4: {name} has shape {w.shape}; expected {flat} inputs")
        flat = w.shape[0]
        last = i == len(fcs) - 1
        x = _linear(g, x, g.init(name, w), None, OUTPUT_NAME if last else None)
        if not last:
            x = g.op("Relu", [x])
    if flat != num_classes:
        raise GraphError(f"conv4: last layer has {flat} outputs but num_classes is {num_classes}")


Builder = Callable[[_Graph, Mapping[str, np.ndarray], tuple[int, ...], int], None]
BUILDERS: dict[str, Builder] = {"mlp": _build_mlp, "conv4": _build_conv4}


def supported_models() -> list[str]:
    return sorted(BUILDERS)


# ----------------------------------------------------------------------------- public API
def build_onnx(
    model: str, tensors: Mapping[str, np.ndarray], in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
    meta: Mapping[str, Any] | None = None, check: bool = True,
) -> onnx.ModelProto:
    """The ONNX model (input "input" [batch, *in_shape] -> output "logits" [batch, classes]).

    `tensors` are the wire tensors of registry model `model`; `meta` goes into the model's
    metadata_props as fedge.<key> (values JSON-encoded). Raises GraphError on any mismatch.
    """
    if model not in BUILDERS:
        raise GraphError(
            f"model {model!r} cannot be rebuilt without torch (supported: {', '.join(supported_models())}); "
            f"export it with `fedge export` on a machine with torch and ship the .onnx file"
        )
    in_shape = tuple(int(d) for d in in_shape)
    g = _Graph()
    BUILDERS[model](g, tensors, in_shape, int(num_classes))
    graph = helper.make_graph(
        g.nodes, f"fedge_{model}",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *in_shape])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", int(num_classes)])],
        initializer=g.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedge.onnx_graph")
    proto.ir_version = IR_VERSION
    info = {"model": model, "in_shape": list(in_shape), "num_classes": int(num_classes), "builder": "onnx_graph"}
    info.update(dict(meta or {}))
    set_metadata(proto, info)
    if check:
        onnx.checker.check_model(proto)
    return proto


def set_metadata(proto: onnx.ModelProto, info: Mapping[str, Any]) -> None:
    """Write fedge.<key> = JSON(value) into metadata_props, replacing existing keys."""
    keep = [p for p in proto.metadata_props if not (p.key.startswith(META_PREFIX) and p.key[len(META_PREFIX):] in info)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key = f"{META_PREFIX}{key}"
        entry.value = json.dumps(value)


def get_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """fedge.* entries of a metadata map (onnx metadata_props or onnxruntime custom_metadata_map)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith(META_PREFIX):
            try:
                out[key[len(META_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(META_PREFIX):]] = value
    return out


def from_model_message(msg: Any, num_classes: int | None = None, in_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """Build from a parsed `models.wire.messages.ModelMessage` (its meta supplies shapes).

    `in_shape`/`num_classes` override or fill in what the header's meta lacks.
    """
    meta = dict(msg.meta or {})
    shape = in_shape or meta.get("in_shape")
    classes = num_classes or meta.get("num_classes")
    if not shape or not isinstance(shape, (list, tuple)):
        raise GraphError("model message has no meta 'in_shape'; pass in_shape explicitly")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise GraphError("model message has no valid meta 'num_classes'; pass num_classes explicitly")
    return build_onnx(
        msg.model, msg.tensors, tuple(shape), classes,
        meta={"run": msg.run, "version": int(msg.version), "fleet": msg.fleet},
    )


def from_envelope(payload: bytes, verifier: Any = None, max_bytes: int | None = None) -> tuple[onnx.ModelProto, Any]:
    """Decode a model envelope (digest checked; with `verifier`, the hub's Ed25519 signature
    is required, see models.wire.keys.hub_verifier) and build its graph.

    Returns (onnx model, ModelMessage). Raises models.wire.EnvelopeError or GraphError.
    """

    msg = parse_model(decode(payload, max_bytes=max_bytes or DEFAULT_MAX_BYTES, verifier=verifier))
    return from_model_message(msg), msg
