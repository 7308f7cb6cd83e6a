"""Wire tensors -> ONNX model, without torch: a graph template exported once with torch, filled.

A device that only serves predictions receives the global model as a fedge envelope of kind
"model" (the same message the trainers get: tensors named like the torch state_dict, header
fields "model" the registry name and "model_options" its options (a ModelSpec, models/spec.py),
meta "in_shape" and "num_classes"). It needs an ONNX graph to
run them in, and must not re-describe each architecture by hand. So every registered model has a
**graph template** (models/onnx_templates/<model>.onnx, package data): the graph torch exported
once from the model's dense form, with the weight initializers emptied, and in its metadata
(``fedge.template``) the slot table: which dense tensor each initializer takes, how each dense
tensor is made from the wire tensors (models/supermask_numpy.py: MPT scores and BNN latent
weights are materialised here), the wire tensors' shapes (``None`` where a dimension follows
in_shape / num_classes or a shape option), the model's family and its registered options
(`TemplateOption`: each option's declaration, and whether the fill applies it, e.g. prune_ratio
and seed, or it only sets tensor sizes, e.g. hidden). `fill` checks the options and every received
tensor, materialises, fills the initializers, sets the input dims from in_shape and checks the
result by ONNX shape inference; the device needs numpy and onnx, never torch.

The templates are written by models/onnx_templates/build.py (torch side), which also proves each
one against torch; tests/test_onnx_templates.py fails when a shipped template no longer matches
what torch exports. `make_template` (the format's one home) is what that builder calls.

Must stay torch-free: import nothing from models.registry, models.nets, models.data, models.export.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fedge.models.wire.envelope import DEFAULT_MAX_BYTES, decode
from fedge.models.wire.messages import parse_model

from .errors import ConfigError, ModelFileError
from .onnx_templates import SUFFIX, TEMPLATE_DIR
from .spec import ModelSpec, Option, OptionValue, unknown_option
from .supermask_numpy import MaterialiseError, materialise

# opset 17 / IR 8: understood by every onnxruntime since 1.13 (late 2022), so an older
# runtime on a device can still load what a newer hub or exporter produces.
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_PREFIX = "fedge."
TEMPLATE_KEY = "template"  # metadata fedge.template: the slot table (JSON)
TEMPLATE_FORMAT = 2  # 2: the model's options are declared in the template (1: prune_ratio only, seed fixed)
#: How a template takes a model option: FILL, the fill applies it (supermask_numpy: prune_ratio,
#: seed); SHAPE, it only sets tensor sizes (an MLP's `hidden`), which the wire tensors carry.
FILL, SHAPE = "fill", "shape"


class GraphError(ModelFileError):
    """Tensors that do not describe a model this module can rebuild; the text says why."""


# ----------------------------------------------------------------------------- the template
@dataclass(frozen=True)
class WireTensor:
    """A tensor the message must carry; `shape` has None where it follows in_shape / num_classes."""

    name: str
    shape: tuple[int | None, ...]

    def fits(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(want is None or want == got for want, got in zip(self.shape, shape))

    def describe(self) -> str:
        return "[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class TemplateOption:
    """An option of the template's model: its registered declaration (spec.Option: type, default,
    range) and how the template takes it (`role` FILL or SHAPE). `dims` of a SHAPE option: the
    (wire tensor, axis) whose size is the option's value, so a header that says hidden=64 over
    tensors of width 200 is refused."""

    option: Option
    role: str
    dims: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.option.to_json(), "role": self.role, "dims": [list(d) for d in self.dims]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TemplateOption:
        if data.get("role") not in (FILL, SHAPE):
            raise ValueError(f"option role must be {FILL!r} or {SHAPE!r}, got {data.get('role')!r}")
        try:
            option = Option.from_json(data)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return cls(option, str(data["role"]), tuple((str(t), int(a)) for t, a in data.get("dims", ())))


@dataclass(frozen=True)
class Template:
    """A model's graph with empty weight slots, and how to fill them (see the module docstring)."""

    model: str
    family: str
    proto: onnx.ModelProto  # initializers named in `slots` hold no data
    slots: dict[str, str]  # initializer name -> dense tensor name
    wire: tuple[WireTensor, ...]  # in state order
    recipe: dict[str, dict[str, Any]]  # dense tensor name -> how it is made (supermask_numpy)
    options: tuple[TemplateOption, ...]  # every option the model is registered with
    private: tuple[str, ...]  # fnmatch patterns of tensors that never leave a trainer
    in_rank: int  # len(in_shape)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: str = "template") -> Template:
        """Read a template file's proto; GraphError if it is not one."""
        info = get_metadata({p.key: p.value for p in proto.metadata_props}).get(TEMPLATE_KEY)
        if not isinstance(info, dict) or info.get("format") != TEMPLATE_FORMAT:
            raise GraphError(f"{source}: not a fedge graph template of format {TEMPLATE_FORMAT} (no fedge.{TEMPLATE_KEY})")
        try:
            template = cls(
                model=str(info["model"]), family=str(info["family"]), proto=proto, slots=dict(info["slots"]),
                wire=tuple(WireTensor(str(w["name"]), tuple(None if d is None else int(d) for d in w["shape"]))
                           for w in info["wire"]),
                recipe={str(k): dict(v) for k, v in info["recipe"].items()},
                options=tuple(TemplateOption.from_json(o) for o in info["options"]),
                private=tuple(info["private"]), in_rank=int(info["in_rank"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GraphError(f"{source}: malformed slot table ({type(exc).__name__}: {exc})") from None
        inits = {i.name for i in proto.graph.initializer}
        if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
            raise GraphError(f"{source}: a template has one input and one output")
        if not set(template.slots) <= inits:
            raise GraphError(f"{source}: slots {sorted(set(template.slots) - inits)[:4]} are no initializers of the graph")
        return template

    def info(self) -> dict[str, Any]:
        """The slot table as stored in fedge.template."""
        return {"format": TEMPLATE_FORMAT, "model": self.model, "family": self.family, "in_rank": self.in_rank,
                "slots": self.slots, "wire": [{"name": w.name, "shape": list(w.shape)} for w in self.wire],
                "recipe": self.recipe, "options": [o.to_json() for o in self.options], "private": list(self.private)}

    def wire_names(self) -> list[str]:
        return [w.name for w in self.wire]

    def option_values(self, given: Mapping[str, Any] | None = None) -> dict[str, OptionValue]:
        """Every option of the model, `given` (a message's model_options) checked against its
        declaration and set over the defaults. GraphError naming an option the model does not
        have (and the ones it has) or a bad value: the registry's words (spec.unknown_option)."""
        declared = {o.option.name: o.option for o in self.options}
        values: dict[str, OptionValue] = {name: option.default for name, option in declared.items()}
        for key, value in dict(given or {}).items():
            try:
                if key not in declared:
                    raise unknown_option(self.model, key, declared.values())
                values[key] = declared[key].check(self.model, value)
            except ConfigError as exc:
                raise GraphError(str(exc)) from None
        return values

    def canonical(self, values: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
        """The options of `values` that differ from the defaults: what a ModelSpec of them holds."""
        return {o.option.name: values[o.option.name] for o in self.options
                if o.option.name in values and values[o.option.name] != o.option.default}


def make_template(
    graph: onnx.ModelProto, model: str, family: str, slots: Mapping[str, str], wire: Sequence[WireTensor],
    recipe: Mapping[str, Mapping[str, Any]], options: Sequence[TemplateOption], private: Sequence[str], in_rank: int,
    extra_meta: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """A template from an exported graph: the slot initializers emptied (dims kept, data gone),
    input and output dims made symbolic, intermediate shapes dropped, the slot table in fedge.template."""
    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    for init in proto.graph.initializer:
        if init.name in slots:
            for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "external_data"):
                init.ClearField(field)
            init.ClearField("data_location")
    del proto.graph.value_info[:]
    _set_dims(proto.graph.input[0], ["batch", *(f"in_{i}" for i in range(in_rank))])
    out_rank = len(proto.graph.output[0].type.tensor_type.shape.dim)
    _set_dims(proto.graph.output[0], ["batch", *(f"out_{i}" for i in range(1, out_rank))])
    del proto.metadata_props[:]
    template = Template(model, family, proto, dict(slots), tuple(wire), {k: dict(v) for k, v in recipe.items()},
                        tuple(options), tuple(private), int(in_rank))
    set_metadata(proto, {TEMPLATE_KEY: template.info(), **dict(extra_meta or {})})
    return proto


# ----------------------------------------------------------------------------- finding templates
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def template_path(model: str, templates: str | Path | None = None) -> Path:
    """Where the template of registered model `model` lives; a name that could leave the folder
    (it comes from a message header) is a GraphError."""
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        hint = " (options are not part of the name: they travel in the header's model_options)" if "@" in str(model) else ""
        raise GraphError(f"model {model!r} is no registered model name{hint}")
    return Path(templates or TEMPLATE_DIR) / f"{model}{SUFFIX}"


def supported_models(templates: str | Path | None = None) -> list[str]:
    """Models that have a template (so a torch-free device can serve them)."""
    return sorted(p.name[: -len(SUFFIX)] for p in Path(templates or TEMPLATE_DIR).glob(f"*{SUFFIX}"))


def load_template(model: str, templates: str | Path | None = None) -> Template:
    """The graph template of `model` from `templates` (default: the shipped ones); cached per file."""
    path = template_path(model, templates)
    if not path.is_file():
        raise GraphError(
            f"model {model!r} has no graph template in {path.parent} (templates: {', '.join(supported_models(templates))}), "
            f"so it cannot be rebuilt without torch; write one with `python -m fedge.models.onnx_templates.build` "
            f"or export the model with `fedge export` on a machine with torch and ship the .onnx file"
        )
    return _load_template(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _load_template(path: str, mtime_ns: int) -> Template:  # noqa: ARG001 - mtime_ns keys the cache
    try:
        proto = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds on a damaged file
        raise GraphError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    return Template.from_proto(proto, path)


# ----------------------------------------------------------------------------- filling
def _checked_wire(template: Template, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The received tensors as float32, each checked against the template by name, shape and finiteness."""
    model, expected = template.model, template.wire_names()
    missing = [n for n in expected if n not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        private = [n for n in missing if any(fnmatchcase(n, p) for p in template.private)]
        if private and not extra and len(private) == len(missing):
            raise GraphError(f"{model}: the message lacks {private[:4]}, which each device keeps for itself "
                             f"({', '.join(template.private)}); a shared model alone cannot be served")
        raise GraphError(f"{model}: tensor names do not match (missing {missing[:4]}, unexpected {extra[:4]})")
    out: dict[str, np.ndarray] = {}
    for spec in template.wire:
        arr = np.asarray(tensors[spec.name])
        if arr.dtype.kind != "f":
            raise GraphError(f"{model}: tensor {spec.name!r} has dtype {arr.dtype}, expected floats")
        if not spec.fits(arr.shape):
            raise GraphError(f"{model}: tensor {spec.name!r} has shape {list(arr.shape)}, expected {spec.describe()}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise GraphError(f"{model}: tensor {spec.name!r} contains NaN or Inf")
        out[spec.name] = arr
    return out


def _check_shape_options(template: Template, values: Mapping[str, OptionValue], wire: Mapping[str, np.ndarray]) -> None:
    """A SHAPE option's value must be the size the wire tensors have where it sets one."""
    for entry in template.options:
        if entry.role != SHAPE:
            continue
        value = values[entry.option.name]
        for tensor, axis in entry.dims:
            size = wire[tensor].shape[axis]
            if size != value:
                raise GraphError(f"{template.model}: option {entry.option.name}={value}, but tensor {tensor!r} is "
                                 f"{size} wide along axis {axis} (shape {list(wire[tensor].shape)}); "
                                 f"the header's model_options and the tensors describe different models")


def _set_dims(value: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def _wire_sources(template: Template, initializers: Iterable[str]) -> list[str]:
    """The wire tensors that feed these initializers (what an error message should name)."""
    out = []
    for init in initializers:
        if init in template.slots:
            dense = template.slots[init]
            out.append(str(template.recipe.get(dense, {}).get("from", dense)))
    return out


def _infer(template: Template, proto: onnx.ModelProto, in_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Strict ONNX shape inference of the filled graph; a mismatch names the tensors of the node it hit.

    ONNX's Conv inference does not compare the input's channels with the weight's, so that is
    checked here on the inferred shapes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        text = str(exc)
        found = re.search(r"node name: ([^)]*)\)", text)
        node = next((n for n in proto.graph.node if found and n.name == found.group(1)), None)
        names = _wire_sources(template, node.input) if node is not None else []
        reason = re.sub(r"\s+", " ", text.split("\n")[0].rsplit("]", 1)[-1]).strip()[:300]
        what = f"tensor{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}" if names else "the tensors"
        where = f" at {node.op_type} node {node.name!r}" if node is not None else ""
        raise GraphError(f"{template.model}: {what}{where} do not fit in_shape {list(in_shape)}: {reason}") from None
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input)}
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = (shapes.get(node.input[0]) or [None, None])[1]
            wanted = inits[node.input[1]][1] * group
            if isinstance(channels, int) and channels != wanted:
                names = _wire_sources(template, [node.input[1]]) or [node.input[1]]
                raise GraphError(f"{template.model}: tensor {names[0]!r} takes {wanted} input channels, but its layer "
                                 f"receives {channels} (in_shape {list(in_shape)})")
    return inferred


def _fold_transposes(proto: onnx.ModelProto) -> None:
    """Transpose(initializer) -> the transposed initializer, as ONNX Runtime would fold it at load.

    A template keeps torch's state_dict layout (bias-free Linear exports as MatMul(x, Transpose(W)));
    folded here, the filled file has the layout torch's folded export has, so int8 quantisation
    (which quantises a MatMul only when its weight is an initializer) treats both alike."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    keep = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Transpose" and node.input else ""
        if source in inits and uses.get(source) == 1:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[source])
            inits[source].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), node.output[0]))
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def fill(
    template: Template, tensors: Mapping[str, np.ndarray], in_shape: Sequence[int], num_classes: int,
    options: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None, check: bool = True,
) -> onnx.ModelProto:
    """The runnable ONNX model: input "input" [batch, *in_shape] -> output "logits" [batch, num_classes, ...].

    `tensors` are the wire tensors (state_dict names); `options` the model's options (a spec's,
    the header's model_options; defaults for the rest): FILL options reach the materialiser,
    SHAPE options must match the tensors' sizes, any other is refused. `meta` lands in
    metadata_props as fedge.<key>. GraphError on any mismatch, naming the tensor or option."""
    model = template.model
    in_shape = tuple(int(d) for d in in_shape)
    if len(in_shape) != template.in_rank or any(d < 1 for d in in_shape):
        raise GraphError(f"{model}: in_shape must be {template.in_rank} positive dimensions, got {list(in_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise GraphError(f"{model}: num_classes must be a positive integer, got {num_classes!r}")
    values = template.option_values(options)
    wire = _checked_wire(template, tensors)
    _check_shape_options(template, values, wire)
    try:
        dense = materialise(template.recipe, wire, template.slots.values(),
                            {o.option.name: values[o.option.name] for o in template.options if o.role == FILL})
    except MaterialiseError as exc:
        raise GraphError(f"{model}: {exc}") from None
    proto = onnx.ModelProto()
    proto.CopyFrom(template.proto)
    for init in proto.graph.initializer:
        if init.name in template.slots:
            init.CopyFrom(numpy_helper.from_array(dense[template.slots[init.name]], init.name))
    _set_dims(proto.graph.input[0], ["batch", *in_shape])
    out = _dims(_infer(template, proto, in_shape).graph.output[0])
    _fold_transposes(proto)
    if len(out) < 2 or out[1] != int(num_classes):
        raise GraphError(f"{model}: the last layer gives {out[1] if len(out) > 1 else '?'} outputs per sample "
                         f"but num_classes is {num_classes}")
    _set_dims(proto.graph.output[0], ["batch", *(d if isinstance(d, int) else f"out_{i}" for i, d in enumerate(out[1:], 1))])
    info: dict[str, Any] = {"model": model, "model_options": template.canonical(values), "family": template.family,
                            "in_shape": list(in_shape), "num_classes": int(num_classes), "builder": "template"}
    info.update(dict(meta or {}))
    del proto.metadata_props[:]
    set_metadata(proto, info)
    proto.producer_name = "fedge.onnx_graph"
    if check:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise GraphError(f"{model}: the filled graph fails onnx.checker: {str(exc)[:300]}") from None
    return proto


def build_onnx(
    model: ModelSpec | str, tensors: Mapping[str, np.ndarray], in_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10, meta: Mapping[str, Any] | None = None, check: bool = True,
    templates: str | Path | None = None,
) -> onnx.ModelProto:
    """The ONNX model of `model` (a ModelSpec: registered name and options; a plain name means
    the defaults) from its wire tensors, via the name's template. Raises GraphError on any mismatch."""
    try:
        spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    except ConfigError as exc:
        raise GraphError(str(exc)) from None
    template = load_template(spec.name, templates)
    return fill(template, tensors, in_shape, num_classes, options=spec.options_dict(), meta=meta, check=check)


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


def from_model_message(
    msg: Any, num_classes: int | None = None, in_shape: tuple[int, ...] | None = None, templates: str | Path | None = None,
) -> onnx.ModelProto:
    """Build from a parsed `models.wire.messages.ModelMessage`: its header's model and
    model_options (`msg.spec`) pick and set up the template, its meta supplies in_shape and
    num_classes (the arguments fill in or override them)."""
    meta = dict(msg.meta or {})
    shape = in_shape or meta.get("in_shape")
    classes = num_classes or meta.get("num_classes")
    if not shape or not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape):
        raise GraphError("model message has no valid meta 'in_shape'; pass in_shape explicitly")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise GraphError("model message has no valid meta 'num_classes'; pass num_classes explicitly")
    try:
        spec = msg.spec
    except ConfigError as exc:  # an empty model name
        raise GraphError(str(exc)) from None
    return build_onnx(
        spec, msg.tensors, tuple(shape), classes, templates=templates,
        meta={"run": msg.run, "version": int(msg.version), "fleet": msg.fleet},
    )


def from_envelope(
    payload: bytes, verifier: Any = None, max_bytes: int | None = None, templates: str | Path | None = None,
) -> tuple[onnx.ModelProto, Any]:
    """Decode a model envelope (digest checked; with `verifier`, the hub's Ed25519 signature
    is required, see models.wire.keys.hub_verifier) and fill its model's template.

    Returns (onnx model, ModelMessage). Raises models.wire.EnvelopeError or GraphError.
    """
    msg = parse_model(decode(payload, max_bytes=max_bytes or DEFAULT_MAX_BYTES, verifier=verifier))
    return from_model_message(msg, templates=templates), msg
