"""Models by name, and the conversion between a torch model and wire-ready numpy tensors."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelFileError
from .mpt_nets import build_mpt
from .nets import MLP, Conv4

Builder = Callable[[tuple[int, ...], int], nn.Module]

MODELS: dict[str, Builder] = {
    "mlp": lambda in_shape, num_classes: MLP(in_shape, num_classes),
    "conv4": lambda in_shape, num_classes: Conv4(in_shape, num_classes),
    # 1-bit Multi-Prize Lottery Tickets (models/mpt_nets.py): the state is only the
    # scores (plus BatchNorm running statistics for 1/1); frozen weights come from the fixed seed 0
    "conv4-mpt": lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="mpt-1/32", prune_ratio=0.8, seed=0
    ),
    "conv4-mpt11": lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="mpt-1/1", prune_ratio=0.8, seed=0
    ),
    "conv4-bnn": lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="bnn-1/32", seed=0
    ),
    "conv4-bnn11": lambda in_shape, num_classes: build_mpt(
        "conv4", in_shape, num_classes, variant="bnn-1/1", seed=0
    ),
    "mlp-mpt": lambda in_shape, num_classes: build_mpt(
        "mlp", in_shape, num_classes, variant="mpt-1/32", prune_ratio=0.8, seed=0
    ),
    "mlp-bnn": lambda in_shape, num_classes: build_mpt(
        "mlp", in_shape, num_classes, variant="bnn-1/32", seed=0
    ),
}


def model_names() -> list[str]:
    return sorted(MODELS)


_MPT_VARIANTS = {"conv4-mpt": ("conv4", "mpt-1/32"), "conv4-mpt11": ("conv4", "mpt-1/1"), "mlp-mpt": ("mlp", "mpt-1/32")}


def _builder(name: str) -> Builder:
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

            return lambda in_shape, num_classes: build_mpt(arch, in_shape, num_classes, variant=variant,
                                                           prune_ratio=prune, seed=0)
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())} "
                     f"(MPT models take a prune ratio: conv4-mpt@0.9)")


def is_known_model(name: str) -> bool:
    try:
        _builder(name)
        return True
    except ValueError:
        return False


def build_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """Instantiate a registered model; with `seed`, its initial weights are reproducible."""
    builder = _builder(name)
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
