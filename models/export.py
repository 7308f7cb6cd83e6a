"""torch -> ONNX export of the models fedge trains, the checker, parity and int8 quantisation.

This side needs torch (it runs where training runs: the hub, a workstation). The device
side, edge_agent/infer/ and models/onnx_graph.py, is torch-free.

Why `torch.onnx.export(..., dynamo=False)`: since torch 2.9 the default is the
torch.export/dynamo exporter, which requires the extra `onnxscript` package (not a fedge
dependency, not installed) and gains nothing for these static feed-forward nets. The
legacy TorchScript exporter produces a plain Flatten/Gemm/Conv/MaxPool graph with a
dynamic batch axis that ONNX Runtime matches to ~1e-7. It emits a DeprecationWarning,
which we silence here. The same exporter writes the graph templates
(models/onnx_templates/build.py) that `builder="graph"` and the devices fill without torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fedge.models import onnx_graph
from fedge.models.wire.envelope import EnvelopeError, decode
from fedge.models.wire.messages import parse_model

from .errors import ConfigError, ModelFileError
from .maskfile import MaskFile, MaskFileError
from .mpt_nets import build_from_mask_file
from .registry import (
    build_model,
    get_state,
    mask_file_spec,
    model_family,
    model_names,
    model_spec,
    private_patterns,
    set_state,
    split_state,
)
from .spec import ModelSpec
from .supermask import BinaryActivation, BinaryWeightLayer, SupermaskLayer, materialize

OPSET = onnx_graph.OPSET
INPUT_NAME = onnx_graph.INPUT_NAME
OUTPUT_NAME = onnx_graph.OUTPUT_NAME
#: Stated tolerance for |torch - onnxruntime| on fp32 logits of order 1 (measured: 1e-8 .. 1e-6;
#: trained models with logits of order 10-50: ~1e-5). export() scales it by max(1, max |logit|).
PARITY_ATOL = 1e-4


class ExportError(ModelFileError):
    """A source that cannot be exported; the text says what to pass instead."""


# ----------------------------------------------------------------------------- supermask hook
def materialize_if_needed(model: nn.Module) -> nn.Module:
    """A plain dense equivalent of a supermask / BNN model (ONNX has no supermask op), or the model itself."""
    special = (SupermaskLayer, BinaryWeightLayer, BinaryActivation)
    if not any(isinstance(m, special) for m in model.modules()):
        return model
    return materialize(model)


def has_binary_activations(model: nn.Module) -> bool:
    """MPT 1/1 and BNN 1/1 models: sign() activations after BatchNorm.

    Their logits cannot match across runtimes exactly: a pre-activation that is 0 in exact
    arithmetic (frequent: equal-magnitude +-1 terms cancel, pruned-away channels) comes out
    as +-1e-7 depending on summation order and onnxruntime's Conv+BatchNorm fusion, and the
    sign flips. export() reports their parity instead of enforcing PARITY_ATOL.
    """
    return any(type(m).__name__ in ("SignActivation", "BinaryActivation") for m in model.modules())


# ----------------------------------------------------------------------------- export
def torch_onnx(model: nn.Module, in_shape: tuple[int, ...], opset: int = OPSET, fold: bool = True) -> onnx.ModelProto:
    """torch.onnx.export (the legacy exporter, dynamic batch axis) of an eval-mode dense model, in memory.

    fold=True (export_onnx): constant folding and the exporter's eval-mode fusions (Conv+BatchNorm,
    pre-transposed Linear weights): the file a run ships. fold=False (graph templates): every
    initializer is a state_dict tensor under its own name, untransposed and unfused, so a
    template's slots map one to one onto tensors; ONNX Runtime folds the same at session start.
    """
    was_training = model.training
    model.eval()
    dummy = torch.zeros(2, *in_shape, dtype=torch.float32)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(
                model, (dummy,), buf, dynamo=False, export_params=True, do_constant_folding=fold,
                training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return onnx.load_model_from_string(buf.getvalue())


def export_onnx(
    model: nn.Module, path: str | os.PathLike, in_shape: tuple[int, ...] = (1, 28, 28),
    meta: Mapping[str, Any] | None = None, opset: int = OPSET, check: bool = True,
) -> Path:
    """Export `model` to ONNX with a dynamic batch axis, then run onnx.checker on the file.

    Input "input" [batch, *in_shape] float32, output "logits" [batch, classes]. Supermask
    models are materialised first. `meta` lands in metadata_props as fedge.<key>.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = materialize_if_needed(model)
    proto = torch_onnx(model, in_shape, opset)
    info = {"in_shape": [int(d) for d in in_shape], "builder": "torch.onnx(dynamo=False)"}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            info["num_classes"] = int(model(torch.zeros(1, *in_shape)).shape[1])
    finally:
        model.train(was_training)
    info.update(dict(meta or {}))
    onnx_graph.set_metadata(proto, info)
    proto.producer_name = "fedge.export"
    onnx.save(proto, str(path))
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


def export_state(
    model: ModelSpec | str, tensors: Mapping[str, np.ndarray], path: str | os.PathLike, in_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10, meta: Mapping[str, Any] | None = None, builder: str = "torch",
) -> Path:
    """Export wire tensors of `model` (a ModelSpec or registered name; "torch": via torch.onnx;
    "graph": by filling the model's shipped graph template with the spec's options, torch-free,
    as a device does). The model's name, options (`model_options`, the spec's: those off their
    defaults) and family (models/families.py) go into the metadata either way."""
    spec = model_spec(model)
    family = model_family(spec).name
    if family == "contrastive":  # its output is the training loss's projection; the predictor would read it as classes
        raise ExportError(f"{spec.name} is a contrastive model: its output is a projection, not a prediction a device "
                          f"could serve; load its encoder into a model with a head (e.g. mlp-private-head) and export that")
    info = {"model": spec.name, "model_options": spec.options_dict(), "family": family, **dict(meta or {})}
    if builder == "graph":
        proto = onnx_graph.build_onnx(spec, tensors, in_shape, num_classes, meta=info)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        return path
    if builder != "torch":
        raise ConfigError(f"builder must be 'torch' or 'graph', not {builder!r}")
    net = build_model(spec, tuple(in_shape), int(num_classes))
    set_state(net, tensors)
    return export_onnx(net, path, tuple(in_shape), meta=info)


# ----------------------------------------------------------------------------- sources
def resolve_source(source: str | os.PathLike | ModelSpec, runs_dir: str | os.PathLike = "runs") -> Path | None:
    """The model file a RUN_OR_MODEL argument names, or None when it is a model (a ModelSpec,
    or a registered name).

    Accepts a .fedge model envelope, a run folder (its final_model.fedge, else its newest
    checkpoint), or a run id under `runs_dir`.
    """
    if isinstance(source, ModelSpec):
        return None
    text = str(source)
    path = Path(text)
    if not path.exists() and (Path(runs_dir) / text).is_dir():
        path = Path(runs_dir) / text
    if path.is_dir():
        final = path / "final_model.fedge"
        if final.is_file():
            return final
        checkpoints = sorted(path.glob("checkpoints/model_v*.fedge"))
        if checkpoints:
            return checkpoints[-1]
        raise ExportError(f"{path} holds neither final_model.fedge nor checkpoints/model_v*.fedge")
    if path.is_file():
        return path

    if text in model_names():
        return None
    raise ExportError(
        f"{text!r} is not a run folder, a run id under {runs_dir}/, a .fedge model file or a model name "
        f"({', '.join(model_names())})"
    )


def load_source(
    source: str | os.PathLike | ModelSpec, runs_dir: str | os.PathLike = "runs", in_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10, seed: int = 0, verifier: Any = None,
) -> tuple[ModelSpec, dict[str, np.ndarray], tuple[int, ...], int, dict[str, Any]]:
    """(model spec, tensors, in_shape, num_classes, meta) of a run, a .fedge file, a 1-bit file
    or a model (a ModelSpec or a registered name).

    A bare model gives its freshly initialised weights (seeded): useful for benchmarks
    and smoke tests, not for predictions.
    """
    path = resolve_source(source, runs_dir)
    if path is None:
        spec = model_spec(source if isinstance(source, ModelSpec) else str(source))
        model = build_model(spec, tuple(in_shape), int(num_classes), seed=seed)
        return spec, get_state(model), tuple(in_shape), int(num_classes), {"source": f"init seed {seed}"}

    data = path.read_bytes()
    if data[:8] == b"FEDGEMPT":  # a 1-bit model file: MPT mask + seed, or BNN signs; per-layer scales

        try:
            mask_file = MaskFile.from_bytes(data)
        except MaskFileError as exc:
            raise ExportError(f"{path}: {exc}") from None
        try:
            spec = mask_file_spec(mask_file)  # the name, prune ratio, seed (and width) the file stores
        except MaskFileError as exc:
            raise ExportError(f"{path}: {exc}") from None
        model = build_from_mask_file(mask_file)
        meta = {"source": str(path), "mask_bytes": mask_file.mask_payload_bytes, **mask_file.meta}
        return spec, get_state(model), tuple(mask_file.in_shape), int(mask_file.num_classes), meta
    try:
        msg = parse_model(decode(data, verifier=verifier))
    except EnvelopeError as exc:
        raise ExportError(f"{path}: not a fedge model file: {exc}") from None
    try:
        spec = model_spec(msg.spec)  # the header's model and options, checked against the registry
    except ConfigError as exc:
        raise ExportError(f"{path}: {exc}") from None
    private = private_patterns(spec)
    if private and not split_state(spec, msg.tensors)[1]:
        raise ExportError(f"{path}: {spec} keeps {', '.join(private)} on each device; this file holds only "
                          f"the shared tensors, so it is no complete model to export")
    shape = tuple(int(d) for d in msg.meta.get("in_shape", in_shape))
    classes = int(msg.meta.get("num_classes", num_classes))
    meta = {"run": msg.run, "version": int(msg.version), "fleet": msg.fleet, "source": str(path)}
    return spec, msg.tensors, shape, classes, meta


def export(
    source: str | os.PathLike | ModelSpec, out: str | os.PathLike | None = None, runs_dir: str | os.PathLike = "runs",
    int8: str | None = None, calibration: np.ndarray | None = None, builder: str = "torch",
    in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int = 0,
) -> dict[str, Any]:
    """`fedge export RUN_OR_MODEL --out model.onnx` as a function. Returns a summary dict:
    {"onnx", "bytes", "model", "in_shape", "num_classes", "max_abs_diff", ["int8", "int8_bytes"]}.

    The exported file is checked twice: onnx.checker, and torch vs onnxruntime on a random
    batch (max_abs_diff must stay under PARITY_ATOL, else ExportError).
    """
    spec, tensors, shape, classes, meta = load_source(source, runs_dir, in_shape, num_classes, seed)
    src = resolve_source(source, runs_dir)
    if out is None:
        out = src.with_suffix(".onnx") if src is not None else Path(f"{spec.name}.onnx")
    path = export_state(spec, tensors, out, shape, classes, meta=meta, builder=builder)
    model = build_model(spec, shape, classes)
    set_state(model, tensors)
    x = np.random.default_rng(seed).normal(size=(8, *shape)).astype(np.float32)
    ref = torch_logits(model, x)
    got = onnx_logits(path, x)
    diff = float(np.abs(ref - got).max())
    tolerance = PARITY_ATOL * max(1.0, float(np.abs(ref).max()))
    binary = has_binary_activations(model)
    if not diff <= tolerance and not binary:
        raise ExportError(f"{path}: onnxruntime differs from torch by {diff:.3g} > {tolerance:.3g}")
    summary: dict[str, Any] = {"onnx": str(path), "bytes": path.stat().st_size, "model": spec.name,
                               "model_options": spec.options_dict(), "in_shape": list(shape),
                               "num_classes": classes, "max_abs_diff": diff,
                               "class_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), **meta}
    if binary:
        summary["parity_note"] = ("binary activations: sign ties make exact torch/onnxruntime parity impossible; "
                                  "not enforced, check accuracy on real data")
    if int8:
        qpath = path.with_name(path.stem + ".int8.onnx")
        quantize_int8(path, qpath, method=int8, calibration=calibration)
        summary.update({"int8": str(qpath), "int8_bytes": qpath.stat().st_size, "int8_method": int8})
    return summary


def export_run(
    run_dir: str | os.PathLike, int8: str | None = "auto", calibration: np.ndarray | None = None,
) -> dict[str, Any]:
    """Hub hook: export runs/<id>/final_model.fedge to final_model.onnx and final_model.int8.onnx.

    Call after write_run_report wrote final_model.fedge; put the result under run.json's
    "onnx" key. int8="auto": static (QDQ) when `calibration` (a few hundred training inputs,
    float32 [N, C, H, W]) is given, else dynamic; None: no int8 file. File names in the
    result are relative to the run folder. Never raises: a failure comes back as
    {"error": "..."} so a finished run is never lost to an export problem.
    """
    run_dir = Path(run_dir)
    method = ("static" if calibration is not None else "dynamic") if int8 == "auto" else int8
    try:
        summary = export(run_dir, out=run_dir / "final_model.onnx", int8=method, calibration=calibration)
    except Exception as exc:  # noqa: BLE001 - reported in run.json instead
        return {"error": f"{type(exc).__name__}: {exc}"}
    for key in ("onnx", "int8"):
        if key in summary:
            summary[key] = Path(summary[key]).name
    summary.pop("source", None)
    return summary


# ----------------------------------------------------------------------------- checks
def onnx_logits(path: str | os.PathLike, x: np.ndarray, threads: int = 1, batch_size: int = 500) -> np.ndarray:
    """ONNX Runtime's logits, straight from the runtime (models/ does not import the device's predictor)."""
    import onnxruntime as ort  # noqa: PLC0415 - only the parity check needs the runtime

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})[0]
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        parts = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))).numpy()
                 for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- int8
class _ArrayReader:
    """onnxruntime CalibrationDataReader over a numpy batch."""

    def __init__(self, x: np.ndarray, batch_size: int = 32) -> None:
        self._batches = [{INPUT_NAME: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)}
                         for i in range(0, len(x), batch_size)]
        self._it = iter(self._batches)

    def get_next(self):  # noqa: ANN201
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_int8(
    src: str | os.PathLike, dst: str | os.PathLike, method: str = "dynamic", calibration: np.ndarray | None = None,
) -> Path:
    """int8 copy of an exported fp32 model with onnxruntime.quantization.

    "dynamic": int8 weights, activations quantised per batch at run time (no data needed;
    Gemm/MatMul -> MatMulInteger, Conv -> ConvInteger). "static": QDQ int8 weights and
    activations with ranges calibrated on `calibration` (a float32 batch of model inputs,
    a few hundred real samples); ONNX Runtime fuses it into QLinearConv/QLinearMatMul.
    """

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static  # noqa: PLC0415 - int8 only

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_* log a "consider pre-processing" warning on the root logger
    try:
        if method == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        elif method == "static":
            if calibration is None or len(calibration) == 0:
                raise ConfigError("static int8 quantisation needs calibration inputs (a float32 batch)")
            quantize_static(
                str(src), str(dst), _ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            )
        else:
            raise ConfigError(f"int8 method must be 'dynamic' or 'static', not {method!r}")
    finally:
        root.setLevel(level)
    proto = onnx.load(str(dst))
    meta = onnx_graph.get_metadata({p.key: p.value for p in proto.metadata_props})
    meta["quantized"] = f"int8-{method}"
    onnx_graph.set_metadata(proto, meta)
    onnx.save(proto, str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def summary_json(summary: Mapping[str, Any]) -> str:
    return json.dumps(dict(summary), indent=1, default=str)
