"""Write (or check) the graph templates of the registered models: the torch side of onnx_graph.

    python -m fedge.models.onnx_templates.build                 # every model in models.registry.MODELS
    python -m fedge.models.onnx_templates.build conv4-mpt mlp   # some of them
    python -m fedge.models.onnx_templates.build --check         # exit 1 if a shipped template is out of date

For a model, `build_template`:

1. builds it from the registry at a reference shape with its options' defaults and
   materialises it to its dense form (models.supermask.materialize for MPT / BNN models), under
   the module names the wire uses;
2. reads the recipe off the torch layers: for each supermask layer its scores tensor, layer
   index, binarisation and weight init, plus the model-wide prune ratio and seed; for each BNN
   layer its latent weight (models/supermask_numpy.py applies it on the device);
3. sorts the model's registered options (`template_options`): those the layers take (prune_ratio,
   seed) the fill applies (FILL); an integer option that only sets tensor sizes (an MLP's
   `hidden`) needs nothing but free dims (SHAPE, with the (tensor, axis) its value sizes); any
   other option is refused, as a template could not serve it;
4. exports the dense model with models.export.torch_onnx(fold=False), so every initializer is a
   state_dict tensor under its own name, and exports it again as a probe: another in_shape and
   num_classes and every option off its default (`probe_value`). The two graphs must be identical
   but for the initializer sizes, which proves no op bakes a shape (a Reshape to a constant would
   differ) and no shape option changes the graph, and tells which tensor dimensions follow
   in_shape / num_classes / the shape options (they are free in the template);
5. empties the initializers (onnx_graph.make_template) and proves the template: filled by
   onnx_graph.fill from the model's *wire* tensors, at the reference (default options) and at the
   probe (its options from the spec, as a message header gives them: the frozen weights of another
   seed, another prune ratio, another width), onnxruntime must give torch's logits (PARITY_ATOL;
   binary-activation models: class agreement, see export.has_binary_activations), the
   numpy-materialised dense tensors must equal torch's, and the filled file must record the
   spec's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fedge.models import onnx_graph
from fedge.models.errors import ConfigError, ModelFileError
from fedge.models.export import PARITY_ATOL, has_binary_activations, materialize_if_needed, onnx_logits, torch_logits, torch_onnx
from fedge.models.onnx_templates import SUFFIX, TEMPLATE_DIR
from fedge.models.registry import MODELS, build_model, get_state, model_names, model_spec, set_state
from fedge.models.spec import ModelSpec, Option, OptionValue
from fedge.models.supermask import binary_weight_layers, supermask_layers
from fedge.models.supermask_numpy import materialise

#: (in_shape, num_classes) a template is exported at, and the probe it is compared with, by family.
REFERENCE = {"classification": ((1, 28, 28), 10), "segmentation": ((1, 28, 28), 1)}
PROBE = {"classification": ((3, 32, 32), 7), "segmentation": ((3, 20, 24), 1)}
#: Families whose output a device serves as predictions. A contrastive model's output is a
#: projection for its training loss, no prediction: it gets no template (its encoder serves
#: through a model with a head, e.g. mlp-private-head).
SERVED_FAMILIES = tuple(REFERENCE)
#: Binary-activation models cannot match torch exactly (sign ties); their classes must agree this often.
BINARY_AGREEMENT = 0.9


class TemplateBuildError(ModelFileError):
    """A model whose graph cannot become a template (or whose template does not reproduce torch)."""


def served_models() -> list[str]:
    """The registered models that get a template: those of a family in SERVED_FAMILIES."""
    return [name for name in model_names() if MODELS[name].family in SERVED_FAMILIES]


class _Under(nn.Module):
    """Puts a materialised body back under the attribute the wire names use ("net.0.weight")."""

    def __init__(self, attr: str, body: nn.Module) -> None:
        super().__init__()
        self.attr = attr
        self.add_module(attr, body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x)


def dense_form(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]], dict[str, Any]]:
    """(dense eval-mode model named like the wire, recipe, model options) of a registry model."""
    dense = materialize_if_needed(model)
    if dense is not model and getattr(model, "forward_is_net", False):  # materialize returned model.net
        dense = _Under("net", dense)
    recipe: dict[str, dict[str, Any]] = {}
    ratios, seeds = set(), set()
    for scores, layer in supermask_layers(model):
        recipe[scores.rsplit(".", 1)[0] + ".weight"] = {
            "op": "supermask", "from": scores, "index": layer.frozen.index, "binarize": layer.binarize,
            "weight_init": layer.frozen.init,
            **({"mask_rule": layer.mask_rule} if layer.mask_rule != "topk" else {}),
        }
        if layer.mask_rule == "topk":  # a FedPM layer's mask is scores > 0: no prune ratio
            ratios.add(layer.prune_ratio)
        seeds.add(layer.frozen.seed)
    for latent, _layer in binary_weight_layers(model):
        recipe[latent] = {"op": "sign", "from": latent}
    if len(ratios) > 1 or len(seeds) > 1:
        raise TemplateBuildError(f"supermask layers differ in prune ratio {sorted(ratios)} or seed {sorted(seeds)}")
    options = {"prune_ratio": ratios.pop(), "seed": seeds.pop()} if ratios else {"seed": seeds.pop()} if seeds else {}
    missing = set(recipe) - set(dense.state_dict())
    if missing:
        raise TemplateBuildError(f"the dense form lacks {sorted(missing)[:4]}: its tensors are not named like the wire's")
    return dense.eval(), recipe, options


@torch.no_grad()
def _distinct(dense: nn.Module) -> nn.Module:
    """Every float tensor set to distinct values in [0.5, 1.5): the exporter merges initializers of
    equal value (all-zero running means would share one slot), and a template holds no values."""
    gen = torch.Generator().manual_seed(0)
    for tensor in dense.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return dense


def _canonical(proto: onnx.ModelProto) -> onnx.GraphProto:
    """The graph without initializer contents and sizes, input/output sizes or intermediate shapes."""
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    for init in graph.initializer:
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "dims"):
            init.ClearField(field)
    del graph.value_info[:]
    for value in (*graph.input, *graph.output):
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
    return graph


def graph_differences(a: onnx.ModelProto, b: onnx.ModelProto, names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Where two graphs differ once sizes are ignored (empty: the same graph), readable."""
    ga, gb = _canonical(a), _canonical(b)
    if ga == gb:
        return []
    out = []
    if len(ga.node) != len(gb.node):
        out.append(f"{len(ga.node)} nodes in {names[0]}, {len(gb.node)} in {names[1]}")
    for i, (na, nb) in enumerate(zip(ga.node, gb.node)):
        if na != nb:
            out.append(f"node {i} differs: {names[0]} {na.op_type} {na.name!r} {list(na.input)} vs "
                       f"{names[1]} {nb.op_type} {nb.name!r} {list(nb.input)}")
            break
    inits_a, inits_b = [i.name for i in ga.initializer], [i.name for i in gb.initializer]
    if inits_a != inits_b:
        out.append(f"initializers differ: {inits_a[:6]} vs {inits_b[:6]}")
    return out or ["the graphs differ (attributes, inputs or outputs)"]


def state_off_ties(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's wire tensors; a binary-activation model gets BatchNorm running means off the
    untrained 0, where sums of +-1 products sit exactly on the sign's tie (as test_onnx does)."""
    state = get_state(model)
    if has_binary_activations(model):
        rng = np.random.default_rng(0)
        for key in state:
            if key.endswith("running_mean"):
                state[key] = rng.uniform(-0.5, 0.5, size=state[key].shape).astype(np.float32)
        set_state(model, state)
    return state


def prove(template: onnx_graph.Template, model: ModelSpec | str, in_shape: tuple[int, ...],
          num_classes: int) -> dict[str, float]:
    """Fill `template` from a fresh `model` (a spec: its options are set) and compare with torch:
    the numpy-materialised dense tensors with torch's, the logits, and the options the filled
    file records with the spec's. Raises TemplateBuildError when they differ. Returns
    {"max_abs_diff", "class_agreement"}."""
    spec = model_spec(model)
    name = str(spec)
    net = build_model(spec, in_shape, num_classes, seed=0).eval()
    wire = state_off_ties(net)
    dense_model, _, _ = dense_form(net)
    reference = {k: v.detach().numpy() for k, v in dense_model.state_dict().items()}
    values = template.option_values(spec.options_dict())
    ours = materialise(template.recipe, wire, template.slots.values(),
                       {o.option.name: values[o.option.name] for o in template.options if o.role == onnx_graph.FILL})
    for key, arr in ours.items():
        exact = template.recipe.get(key, {}).get("op") in (None, "copy", "supermask") and \
            template.recipe.get(key, {}).get("weight_init", "signed_constant") == "signed_constant"
        same = np.array_equal(arr, reference[key]) if exact else np.allclose(arr, reference[key], rtol=1e-5, atol=1e-7)
        if not same:
            raise TemplateBuildError(f"{name}: the numpy materialiser's {key!r} differs from torch's materialize")
    proto = onnx_graph.fill(template, wire, in_shape, num_classes, options=spec.options_dict())
    recorded = onnx_graph.get_metadata({p.key: p.value for p in proto.metadata_props}).get("model_options")
    if recorded != spec.options_dict():
        raise TemplateBuildError(f"{name}: the filled file records model_options {recorded}, the spec has {spec.options_dict()}")
    x = np.random.default_rng(1).normal(size=(16, *in_shape)).astype(np.float32)
    ref, got = torch_logits(net, x), onnx_logits(proto.SerializeToString(), x)
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if has_binary_activations(net):
        if agree < BINARY_AGREEMENT:
            raise TemplateBuildError(f"{name} at {in_shape}: classes agree with torch on only {agree:.0%}")
    elif diff > PARITY_ATOL * max(1.0, float(np.abs(ref).max())):
        raise TemplateBuildError(f"{name} at {in_shape}: the filled template differs from torch by {diff:.3g}")
    return {"max_abs_diff": diff, "class_agreement": agree}


def probe_value(model: str, option: Option) -> OptionValue:
    """A valid value of `option` other than its default. The probe build sets every option so,
    which shows what each changes: tensor sizes become free dims of the template, anything
    else in the graph is refused."""
    default = option.default
    if option.choices:
        candidates: list[Any] = [c for c in option.choices if c != default]
    elif option.kind is int:
        candidates = [int(default) // 2 + 1, int(default) + 1, int(default) - 1]
    elif option.kind is float:
        low = float(default) - 1.0 if option.low is None else option.low
        high = float(default) + 1.0 if option.high is None else option.high
        candidates = [(low + high) / 2, (low + float(default)) / 2, (float(default) + high) / 2]
    else:
        candidates = []
    for value in candidates:
        try:
            if value != default:
                return option.check(model, value)
        except ConfigError:
            continue
    raise TemplateBuildError(f"{model}: option {option.describe()} has no other value a probe build could set")


def template_options(name: str, applied: Mapping[str, Any], shape: tuple[int, ...], classes: int,
                     ) -> tuple[list[onnx_graph.TemplateOption], dict[str, OptionValue]]:
    """(the template's options, the probe's non-default values) of registered model `name`:
    FILL for what the materialiser applies (`applied`, read off the layers: prune_ratio, seed),
    SHAPE for an integer option that leaves the graph alone (checked on the probe) and changes
    only tensor sizes; `dims` are the (tensor, axis) whose size is its value, found by building
    the model at `shape` with only that option changed."""
    registered = MODELS[name]
    declared = {o.name for o in registered.options}
    if set(applied) - declared:
        raise TemplateBuildError(f"{name}: its layers take {sorted(set(applied) - declared)}, which it is not registered "
                                 f"with as options (registry.Registered.options), so a message could not set them")
    probe = {o.name: probe_value(name, o) for o in registered.options}
    default_state = {k: v.shape for k, v in get_state(build_model(name, shape, classes, seed=0)).items()}
    out = []
    for option in registered.options:
        if option.name in applied:
            out.append(onnx_graph.TemplateOption(option, onnx_graph.FILL))
            continue
        if option.kind is not int:
            raise TemplateBuildError(f"{name}: option {option.describe()} is neither applied by the fill "
                                     f"({', '.join(sorted(applied)) or 'none here'}) nor an integer that sets tensor "
                                     f"sizes; a graph template cannot serve it")
        changed = get_state(build_model(ModelSpec(name, {option.name: probe[option.name]}), shape, classes, seed=0))
        dims = tuple((tensor, axis) for tensor, size in default_state.items() for axis, d in enumerate(size)
                     if d == option.default and changed[tensor].shape[axis] == probe[option.name])
        out.append(onnx_graph.TemplateOption(option, onnx_graph.SHAPE, dims))
    return out, probe


def build_template(
    name: str, reference: tuple[tuple[int, ...], int] | None = None, probe: tuple[tuple[int, ...], int] | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """The template of registered model `name` (see the module docstring); raises TemplateBuildError."""
    if name not in MODELS:
        raise TemplateBuildError(f"unknown model {name!r}; registered: {', '.join(model_names())}")
    registered = MODELS[name]
    if registered.family not in SERVED_FAMILIES:
        raise TemplateBuildError(f"{name} is a {registered.family} model: its output is no prediction a device could "
                                 f"serve, so it gets no template (served families: {', '.join(SERVED_FAMILIES)})")
    ref_shape, ref_classes = reference or REFERENCE[registered.family]
    probe_shape, probe_classes = probe or PROBE[registered.family]
    model = build_model(name, ref_shape, ref_classes, seed=0)
    dense, recipe, applied = dense_form(model)
    options, probe_options = template_options(name, applied, ref_shape, ref_classes)
    probe_spec = ModelSpec(name, probe_options)  # every option off its default
    other = build_model(probe_spec, probe_shape, probe_classes, seed=0)
    probe_dense, _, probe_applied = dense_form(other)
    if probe_applied != {k: probe_options[k] for k in applied}:
        raise TemplateBuildError(f"{name}: built with options {probe_options}, its layers have {probe_applied}")
    graph = torch_onnx(_distinct(dense), ref_shape, fold=False)
    probe_graph = torch_onnx(_distinct(probe_dense), probe_shape, fold=False)
    diff = graph_differences(graph, probe_graph, (f"in_shape {list(ref_shape)}", f"{probe_spec} at {list(probe_shape)}"))
    if diff:
        changers = [o.option.name for o in options if o.role == onnx_graph.SHAPE and graph_differences(graph, torch_onnx(
            _distinct(dense_form(build_model(ModelSpec(name, {o.option.name: probe_options[o.option.name]}),
                                             ref_shape, ref_classes, seed=0))[0]), ref_shape, fold=False))]
        if changers:
            raise TemplateBuildError(f"{name}: option(s) {', '.join(changers)} change the exported graph, not only tensor "
                                     f"sizes ({'; '.join(diff)}); a graph template cannot serve them")
        raise TemplateBuildError(f"{name}: the exported graph depends on in_shape / num_classes ({'; '.join(diff)}); "
                                 f"an op bakes a shape (e.g. Reshape to a constant: use nn.Flatten)")
    state, probe_state = get_state(model), get_state(other)
    wire = [onnx_graph.WireTensor(k, tuple(a if a == b else None for a, b in zip(v.shape, probe_state[k].shape)))
            for k, v in state.items()]
    dense_names = set(dense.state_dict())
    slots = {init.name: init.name for init in graph.graph.initializer if init.name in dense_names}
    constants = [init.name for init in graph.graph.initializer if init.name not in dense_names]
    if constants:
        raise TemplateBuildError(f"{name}: initializers {constants[:4]} are no tensors of the model")
    sources = {recipe.get(dense_name, {}).get("from", dense_name) for dense_name in slots.values()}
    if sources != set(state):
        raise TemplateBuildError(f"{name}: graph slots take {sorted(sources - set(state))[:4]}, which are not on the wire, "
                                 f"and no slot takes wire tensors {sorted(set(state) - sources)[:4]}")
    proto = onnx_graph.make_template(graph, name, registered.family, slots, wire, recipe, options, registered.private,
                                     len(ref_shape), extra_meta={"built_with": f"torch {torch.__version__}"})
    if check:
        template = onnx_graph.Template.from_proto(proto, name)
        prove(template, name, tuple(ref_shape), ref_classes)
        prove(template, probe_spec, tuple(probe_shape), probe_classes)
    return proto


def template_differences(shipped: onnx.ModelProto, fresh: onnx.ModelProto) -> list[str]:
    """Why a shipped template no longer matches a fresh build (empty: it does)."""
    out = graph_differences(shipped, fresh, ("shipped", "fresh"))
    if [list(i.dims) for i in shipped.graph.initializer] != [list(i.dims) for i in fresh.graph.initializer]:
        out.append("initializer sizes differ")
    a = onnx_graph.Template.from_proto(shipped, "shipped").info()
    b = onnx_graph.Template.from_proto(fresh, "fresh").info()
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"slot table {key!r} differs")
    return out


def write_templates(names: Sequence[str] | None = None, directory: str | Path = TEMPLATE_DIR) -> list[Path]:
    """Build and write the templates of `names` (default: every served registered model)."""
    out = []
    for name in names or served_models():
        path = Path(directory) / f"{name}{SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build_template(name), str(path))
        out.append(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedge.models.onnx_templates.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="registered model names (default: every classification and segmentation model)")
    parser.add_argument("--dir", default=str(TEMPLATE_DIR), help=f"template folder (default {TEMPLATE_DIR})")
    parser.add_argument("--check", action="store_true", help="only compare the shipped templates with a fresh build")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stale = []
    try:
        for name in args.models or served_models():
            path = Path(args.dir) / f"{name}{SUFFIX}"
            if args.check:
                why = ["missing"] if not path.is_file() else template_differences(onnx.load(str(path)), build_template(name))
                print(f"{name}: {'ok' if not why else 'OUT OF DATE: ' + '; '.join(why)}")
                stale += [name] if why else []
            else:
                (written,) = write_templates([name], args.dir)
                print(f"wrote {written} ({written.stat().st_size} bytes)")
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stale:
        print(f"rebuild with: python -m fedge.models.onnx_templates.build {' '.join(stale)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
