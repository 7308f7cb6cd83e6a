"""Registered models (name, builder, options, private tensors, family), what a ModelSpec of one
builds, and the conversion between a torch model and wire-ready numpy tensors.

Every function here takes a ModelSpec (models/spec.py) or, for convenience, a plain registered
name; options live in the spec, never in the name."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelFileError
from .families import Family, get_family
from .maskfile import MaskFile, MaskFileError
from .mpt_nets import build_mpt
from .nets import MLP, ContrastiveMLP, Conv4, SplitMLP
from .spec import ModelSpec, Option, OptionValue, split_option_text, unknown_option
from .supermask.fedpm import use_sampled_masks

Builder = Callable[..., nn.Module]  # (in_shape, num_classes, **options) -> model


@dataclass(frozen=True)
class Registered:
    """A registered model: how to build it, the options it takes (spec.Option: name, type,
    default, range; a ModelSpec may set them), and which of its tensors are private (fnmatch
    patterns on get_state names, e.g. 'head.*'). Private tensors never leave the device: the
    hub sends, checks, aggregates and checkpoints only the shared ones (split_state). `family`
    names its task family (families.py): the loss the trainer minimises and the metrics
    evaluation reports. `build(in_shape, num_classes, **options)` gets every option, defaults
    filled in."""

    build: Builder
    private: tuple[str, ...] = ()
    family: str = "classification"
    options: tuple[Option, ...] = ()

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


def _image_shape(model: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[C, H, W] of a convolutional model's input: any channel count, H and W at least 4 (two
    2x2 poolings must leave a pixel)."""
    if len(in_shape) != 3 or min(in_shape[1:]) < 4:
        raise ConfigError(f"model {model} takes inputs [C, H, W] with H, W >= 4 (any C); got in_shape {list(in_shape)}")
    return in_shape[0], in_shape[1], in_shape[2]


def _mpt(arch: str, variant: str, name: str) -> Builder:
    def build(in_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
        if arch == "conv4":
            _image_shape(name, in_shape)
        return build_mpt(arch, in_shape, num_classes, variant=variant, **options)
    return build


def _fedpm(arch: str, name: str) -> Builder:
    """An MPT 1/32 net whose layers use FedPM's sampled masks (models/supermask/fedpm.py)."""
    inner = _mpt(arch, "mpt-1/32", name)

    def build(in_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
        return use_sampled_masks(inner(in_shape, num_classes, **options))
    return build


def _conv4(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Conv4(_image_shape("conv4", in_shape), num_classes)


# The options models take. MPT models: their frozen random weights come from `seed` (models/bits.py)
# and `prune_ratio` of each layer's weights are pruned; every participant builds the same model
# because the spec (and so the seed and ratio) travels with the model envelope.
HIDDEN = Option("hidden", int, 200, "width of the two hidden layers", low=1, high=65536)
PRUNE_RATIO = Option("prune_ratio", float, 0.8, "fraction of each layer's weights removed (0.8 keeps 20 %)",
                     low=0.0, high=1.0, high_open=True)
SEED = Option("seed", int, 0, "seed of the frozen random weights", low=0, high=2**32 - 1)

MODELS: dict[str, Registered] = {
    "mlp": Registered(MLP, options=(HIDDEN,)),
    "conv4": Registered(_conv4),
    # 1-bit Multi-Prize Lottery Tickets (models/mpt_nets.py): the state is only the
    # scores (plus BatchNorm running statistics for 1/1); frozen weights come from the seed
    "conv4-mpt": Registered(_mpt("conv4", "mpt-1/32", "conv4-mpt"), options=(PRUNE_RATIO, SEED)),
    "conv4-mpt11": Registered(_mpt("conv4", "mpt-1/1", "conv4-mpt11"), options=(PRUNE_RATIO, SEED)),
    # BNN baselines: binary weights trained through latent float weights that travel; nothing frozen
    "conv4-bnn": Registered(_mpt("conv4", "bnn-1/32", "conv4-bnn")),
    "conv4-bnn11": Registered(_mpt("conv4", "bnn-1/1", "conv4-bnn11")),
    "mlp-mpt": Registered(_mpt("mlp", "mpt-1/32", "mlp-mpt"), options=(PRUNE_RATIO, SEED, HIDDEN)),
    # FedPM (strategy fedpm): masks drawn from sigmoid(scores); the prune ratio is unused
    # (the keep-probabilities are learnt), so it is not an option
    "mlp-fedpm": Registered(_fedpm("mlp", "mlp-fedpm"), options=(SEED, HIDDEN)),
    "conv4-fedpm": Registered(_fedpm("conv4", "conv4-fedpm"), options=(SEED,)),
    "mlp-bnn": Registered(_mpt("mlp", "bnn-1/32", "mlp-bnn"), options=(HIDDEN,)),
    # the MLP with a per-device classifier: the encoder is federated, each device keeps its head
    "mlp-private-head": Registered(SplitMLP, private=("head.*",), options=(HIDDEN,)),
    # paper 002's self-supervised backbone: the MLP encoder under a projection head, trained with NT-Xent
    "mlp-contrastive": Registered(ContrastiveMLP, family="contrastive", options=(HIDDEN,)),
}
BUILTIN_MODELS = frozenset(MODELS)  # fedge's own; any other entry was registered by the running program


def registrations(names: Iterable[str]) -> dict[str, Registered]:
    """The registrations of those of `names` that fedge does not ship (a program's own models):
    what a training worker in another process or machine must be given to build them."""
    return {name: _registered(name) for name in names if name not in BUILTIN_MODELS}


def adopt(models: Mapping[str, Registered]) -> None:
    """Register another process's own models here (a training worker), keeping any of ours."""
    for name, reg in models.items():
        MODELS.setdefault(name, reg)


def model_names() -> list[str]:
    return sorted(MODELS)


def _registered(name: str) -> Registered:
    """The registration of `name`, exactly as registered (options travel in a ModelSpec, never in the name)."""
    if name in MODELS:
        return MODELS[name]
    hint = " (options are not part of the name: a ModelSpec, or --model-option NAME=VALUE)" if "@" in name else ""
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())}{hint}")


def _resolve(model: ModelSpec | str) -> tuple[ModelSpec, Registered, dict[str, OptionValue]]:
    """(canonical spec, registration, every option with defaults filled in) of `model`; a
    ConfigError names an unknown model, an unknown option (and the allowed ones) or a bad value."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    reg = _registered(spec.name)
    full = {o.name: o.default for o in reg.options}
    given: dict[str, OptionValue] = {}
    for key, value in spec.options:
        option = reg.option(key)
        if option is None:
            raise unknown_option(spec.name, key, reg.options)
        full[key] = option.check(spec.name, value)
        if full[key] != option.default:
            given[key] = full[key]
    canonical = spec if given == dict(spec.options) else ModelSpec(spec.name, given)
    return canonical, reg, full


def model_spec(model: ModelSpec | str, options: Mapping[str, OptionValue] | None = None) -> ModelSpec:
    """The checked, canonical spec of `model` (a spec, or a registered name) with `options` set
    on top: options left at their defaults are dropped, so equal specs build equal models."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    if options:
        spec = ModelSpec(spec.name, {**spec.options_dict(), **options})
    return _resolve(spec)[0]


def parse_model_options(name: str, texts: Iterable[str]) -> dict[str, OptionValue]:
    """Command-line option texts ('prune_ratio=0.9') of model `name` as typed, checked values."""
    reg = _registered(name)
    out: dict[str, OptionValue] = {}
    for text in texts:
        key, raw = split_option_text(text)
        option = reg.option(key)
        if option is None:
            raise unknown_option(name, key, reg.options)
        out[key] = option.parse(name, raw)
    return out


def model_options(model: ModelSpec | str) -> dict[str, OptionValue]:
    """Every option of `model`, defaults filled in (what its builder gets)."""
    return _resolve(model)[2]


def option_schema(model: ModelSpec | str) -> tuple[Option, ...]:
    """The options model `model` declares (its registration's)."""
    return _resolve(model)[1].options


def mask_file_spec(mask_file: MaskFile) -> ModelSpec:
    """The spec of the model a 1-bit file holds, from the fields the file stores (its model
    name, prune ratio and seed, and meta "hidden" for MLPs): the options its registration takes."""
    values: dict[str, OptionValue] = {"seed": mask_file.seed, "hidden": mask_file.meta.get("hidden", HIDDEN.default)}
    if mask_file.bits == "mask":  # a sign file (BNN) prunes nothing; its prune_ratio field is 0
        values["prune_ratio"] = mask_file.prune_ratio
    try:
        reg = _registered(mask_file.model)
        return model_spec(mask_file.model, {o.name: values[o.name] for o in reg.options if o.name in values})
    except ConfigError as exc:
        raise MaskFileError(f"mask file of model {mask_file.model!r}: {exc}") from None


def is_known_model(model: ModelSpec | str) -> bool:
    """Whether `model` is a registered name (and its options, if a spec, are valid)."""
    try:
        _resolve(model)
        return True
    except ConfigError:
        return False


def build_model(model: ModelSpec | str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                seed: int | None = None) -> nn.Module:
    """Instantiate a model from its spec (or plain registered name); with `seed`, its initial
    weights are reproducible. Any input shape its layers allow: MLPs flatten any [C, H, W],
    the Conv-4 models take any channel count C."""
    _, reg, options = _resolve(model)
    name = model.name if isinstance(model, ModelSpec) else model
    shape = tuple(int(d) for d in in_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"model {name}: in_shape must be positive sizes, got {list(in_shape)}")
    # Initial weights come from torch's one global generator. A seeded build sets it and draws;
    # another thread's build drawing in between (a trainer built on a pool thread while an
    # agent builds its seeded head) would shift the seeded weights. One build at a time.
    with _BUILD_LOCK:
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return reg.build(shape, int(num_classes), **options)
        return reg.build(shape, int(num_classes), **options)


_BUILD_LOCK = threading.RLock()  # re-entrant: a builder may build a sub-model through build_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(model: ModelSpec | str, in_shape: tuple[int, ...], num_classes: int) -> int:
    """Trainable parameters of a model, built once per (spec, shape, classes): a fleet of 100
    virtual devices checks its memory budget without building 100 models."""
    return _parameter_count(model_spec(model), tuple(int(d) for d in in_shape), int(num_classes))


@functools.lru_cache(maxsize=64)
def _parameter_count(spec: ModelSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    return count_parameters(build_model(spec, in_shape, num_classes))


def get_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Every float tensor of the model (parameters and float buffers), as float32 numpy."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            out[name] = tensor.detach().to("cpu", torch.float32).numpy().copy()
    return out


def set_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load wire tensors into a model in place (strict on names, shapes checked by torch)."""
    current = model.state_dict()
    tensors = {}
    for name, arr in state.items():
        if name not in current:
            raise ModelFileError(f"tensor {name!r} is not part of the model")
        tensors[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32)).to(current[name].dtype)
    missing = [k for k, v in current.items() if v.is_floating_point() and k not in tensors]
    if missing:
        raise ModelFileError(f"state misses tensors {missing[:5]}")
    model.load_state_dict(tensors, strict=False)


def private_patterns(model: ModelSpec | str) -> tuple[str, ...]:
    """The model's private tensor patterns (empty: every tensor is shared)."""
    return _resolve(model)[1].private


def is_private(model: ModelSpec | str, tensor: str) -> bool:
    """Whether tensor `tensor` of `model` stays on the device."""
    return any(fnmatchcase(tensor, pattern) for pattern in private_patterns(model))


def model_family(model: ModelSpec | str) -> Family:
    """The task family of `model` (families.FAMILIES), from its registration: its loss and metrics."""
    return get_family(_resolve(model)[1].family)


def split_state(model: ModelSpec | str,
                state: Mapping[str, np.ndarray]) -> tuple[OrderedDict[str, np.ndarray], OrderedDict[str, np.ndarray]]:
    """(shared, private) parts of a state of `model`, each in the state's order. The shared
    part is all that ever travels or is stored by the hub; the private part stays on the device."""
    patterns = private_patterns(model)
    shared: OrderedDict[str, np.ndarray] = OrderedDict()
    private: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in state.items():
        (private if any(fnmatchcase(key, p) for p in patterns) else shared)[key] = value
    return shared, private
