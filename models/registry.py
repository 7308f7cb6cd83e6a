"""Models by name, and the conversion between a torch model and wire-ready numpy tensors."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelFileError
from .families import Family, get_family
from .mpt_nets import build_mpt
from .nets import MLP, ContrastiveMLP, Conv4, SplitMLP

Builder = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class Registered:
    """A registered model: how to build it, and which of its tensors are private (fnmatch
    patterns on get_state names, e.g. 'head.*'). Private tensors never leave the device: the
    hub sends, checks, aggregates and checkpoints only the shared ones (split_state). `family`
    names its task family (families.py): the loss the trainer minimises and the metrics
    evaluation reports."""

    build: Builder
    private: tuple[str, ...] = ()
    family: str = "classification"


MODELS: dict[str, Registered] = {
    "mlp": Registered(lambda in_shape, num_classes: MLP(in_shape, num_classes)),
    "conv4": Registered(lambda in_shape, num_classes: Conv4(in_shape, num_classes)),
    # 1-bit Multi-Prize Lottery Tickets (models/mpt_nets.py): the state is only the
    # scores (plus BatchNorm running statistics for 1/1); frozen weights come from the fixed seed 0
    "conv4-mpt": Registered(lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="mpt-1/32", prune_ratio=0.8, seed=0
    )),
    "conv4-mpt11": Registered(lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="mpt-1/1", prune_ratio=0.8, seed=0
    )),
    "conv4-bnn": Registered(lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="bnn-1/32", seed=0
    )),
    "conv4-bnn11": Registered(lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="bnn-1/1", seed=0
    )),
    "mlp-mpt": Registered(lambda in_shape, num_classes: build_mpt(
        "mlp", in_shape, num_classes, variant="mpt-1/32", prune_ratio=0.8, seed=0
    )),
    "mlp-bnn": Registered(lambda in_shape, num_classes: build_mpt(
        "mlp", in_shape, num_classes, variant="bnn-1/32", seed=0
    )),
    # the MLP with a per-device classifier: the encoder is federated, each device keeps its head
    "mlp-private-head": Registered(lambda in_shape, num_classes: SplitMLP(in_shape, num_classes), private=("head.*",)),
    # paper 002's self-supervised backbone: the MLP encoder under a projection head, trained with NT-Xent
    "mlp-contrastive": Registered(lambda in_shape, num_classes: ContrastiveMLP(in_shape, num_classes), family="contrastive"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


_MPT_VARIANTS = {"conv4-mpt": ("conv4", "mpt-1/32"), "conv4-mpt11": ("conv4", "mpt-1/1"), "mlp-mpt": ("mlp", "mpt-1/32")}


def _registered(name: str) -> Registered:
    """Registered name, or an MPT name with a prune ratio: 'conv4-mpt@0.5' keeps 50 %."""
    if name in MODELS:
        return MODELS[name]
    base, _, ratio = name.partition("@")
    if base in _MPT_VARIANTS and ratio:
        try:
            prune = float(ratio)
        except ValueError:
            prune = -1.0
        if 0.0 <= prune < 1.0:
            arch, variant = _MPT_VARIANTS[base]

            return Registered(lambda in_shape, num_classes: build_mpt(
                arch, in_shape, num_classes, variant=variant, prune_ratio=prune, seed=0))
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())} "
                     f"(MPT models take a prune ratio: conv4-mpt@0.9)")


def is_known_model(name: str) -> bool:
    try:
        _registered(name)
        return True
    except ValueError:
        return False


def build_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """Instantiate a registered model; with `seed`, its initial weights are reproducible."""
    builder = _registered(name).build
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(tuple(in_shape), int(num_classes))
    return builder(tuple(in_shape), int(num_classes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=64)
def parameter_count(name: str, in_shape: tuple[int, ...], num_classes: int) -> int:
    """Trainable parameters of a registered model, built once per (name, shape, classes):
    a fleet of 100 virtual devices checks its memory budget without building 100 models."""
    return count_parameters(build_model(name, tuple(in_shape), int(num_classes)))


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


def private_patterns(name: str) -> tuple[str, ...]:
    """The model's private tensor patterns (empty: every tensor is shared)."""
    return _registered(name).private


def is_private(name: str, tensor: str) -> bool:
    """Whether tensor `tensor` of model `name` stays on the device."""
    return any(fnmatchcase(tensor, pattern) for pattern in _registered(name).private)


def model_family(name: str) -> Family:
    """The task family of model `name` (families.FAMILIES): its loss and metrics."""
    return get_family(_registered(name).family)


def split_state(name: str, state: Mapping[str, np.ndarray]) -> tuple[OrderedDict[str, np.ndarray], OrderedDict[str, np.ndarray]]:
    """(shared, private) parts of a state of model `name`, each in the state's order. The shared
    part is all that ever travels or is stored by the hub; the private part stays on the device."""
    patterns = _registered(name).private
    shared: OrderedDict[str, np.ndarray] = OrderedDict()
    private: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in state.items():
        (private if any(fnmatchcase(key, p) for p in patterns) else shared)[key] = value
    return shared, private
