"""Conv-4 and MLP built from supermask layers (MPT) or latent-weight binary layers (BNN).

Variants (paper 003's naming, weights/activations bits):

* ``mpt-1/32``: supermask, binarised weights alpha*sign(W)*m, real activations (ReLU), no BN.
* ``mpt-1/1``:  same weights; blocks conv -> [maxpool] -> BatchNorm(affine=False) -> sign
  (piecewise-quadratic straight-through); the input image and the logits stay real.
* ``bnn-1/32``, ``bnn-1/1``: the BNN baseline, binary weights trained through latent float
  weights (sign in forward, clipped straight-through gradient), no pruning; same layouts.

Architectures match models/nets.py: Conv-4 (conv 64,64, pool, conv 128,128, pool,
fc 256,256,classes; 3x3 pad 1; no biases; 1,932,352 weights on 1x28x28) and the MLP
784-200-200-classes, here without biases.

Every participant must build the same frozen weights: they are a function of
(``seed``, layer index, shape) only (models/bits.py), never of torch's RNG, so the registry
entries use the fixed default seed 0. The scores' initial values come from torch's RNG (the
registry's `seed` argument makes them reproducible); they travel anyway.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .maskfile import LayerInfo, MaskFile, MaskFileError, load_mask_file
from .supermask import (
    BinaryActivation,
    BinaryConv2d,
    BinaryLinear,
    SupermaskConv2d,
    SupermaskLinear,
    binary_weight_layers,
    layer_alphas,
    materialize,
    model_masks,
    set_scores,
    set_scores_from_masks,
    supermask_layers,
)
from .supermask.fedpm import SAMPLE, use_sampled_masks

VARIANTS = ("mpt-1/32", "mpt-1/1", "bnn-1/32", "bnn-1/1")

# (arch, variant) -> name in models.registry.MODELS
REGISTRY_NAMES: dict[tuple[str, str], str] = {
    ("conv4", "mpt-1/32"): "conv4-mpt",
    ("conv4", "mpt-1/1"): "conv4-mpt11",
    ("conv4", "bnn-1/32"): "conv4-bnn",
    ("conv4", "bnn-1/1"): "conv4-bnn11",
    ("mlp", "mpt-1/32"): "mlp-mpt",
    ("mlp", "bnn-1/32"): "mlp-bnn",
}

class _Layers:
    """Makes the layers of one variant, numbering supermask layers for their seeds."""

    def __init__(self, variant: str, prune_ratio: float, seed: int, weight_init: str) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        self.variant = variant
        self.mpt = variant.startswith("mpt")
        self.binary_act = variant.endswith("1/1")
        self.prune_ratio, self.seed, self.weight_init = prune_ratio, seed, weight_init
        self.index = 0

    def conv(self, cin: int, cout: int) -> nn.Module:
        if not self.mpt:
            return BinaryConv2d(cin, cout, 3, padding=1)
        layer = SupermaskConv2d(
            cin, cout, 3, padding=1, prune_ratio=self.prune_ratio, binarize=True, seed=self.seed, index=self.index,
            weight_init=self.weight_init,
        )
        self.index += 1
        return layer

    def linear(self, fin: int, fout: int) -> nn.Module:
        if not self.mpt:
            return BinaryLinear(fin, fout)
        layer = SupermaskLinear(
            fin, fout, prune_ratio=self.prune_ratio, binarize=True, seed=self.seed, index=self.index,
            weight_init=self.weight_init,
        )
        self.index += 1
        return layer

    def block(self, layer: nn.Module, channels: int, pool: bool, conv: bool) -> list[nn.Module]:
        """1/32: layer -> ReLU -> [pool]; 1/1: layer -> [pool] -> BN(affine=False) -> sign."""
        if not self.binary_act:
            return [layer, nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
        bn = nn.BatchNorm2d(channels, affine=False) if conv else nn.BatchNorm1d(channels, affine=False)
        return [layer] + ([nn.MaxPool2d(2)] if pool else []) + [bn, BinaryActivation()]


class MPTNet(nn.Module):
    """Base of the MPT / BNN nets: the whole model is `self.net`, an nn.Sequential."""

    forward_is_net = True  # lets supermask.materialize return a plain nn.Sequential
    arch = ""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        variant: str,
        prune_ratio: float,
        seed: int,
        weight_init: str,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(d) for d in in_shape)
        self.num_classes = int(num_classes)
        self.variant = variant
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.weight_init = weight_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def registry_name(self) -> str:
        return REGISTRY_NAMES.get((self.arch, self.variant), f"{self.arch}-{self.variant}")

    def config(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "variant": self.variant,
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
            "prune_ratio": self.prune_ratio,
            "seed": self.seed,
            "weight_init": self.weight_init,
        }


class MPTConv4(MPTNet):
    """Conv-4 of the MPT paper (see models/nets.Conv4) built from supermask or binary layers."""

    arch = "conv4"

    def __init__(
        self,
        in_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        variant: str = "mpt-1/32",
        prune_ratio: float = 0.8,
        seed: int = 0,
        weight_init: str = "signed_constant",
    ) -> None:
        super().__init__(in_shape, num_classes, variant, prune_ratio, seed, weight_init)
        channels, height, width = self.in_shape
        mk = _Layers(variant, prune_ratio, seed, weight_init)
        flat = 128 * (height // 4) * (width // 4)
        layers: list[nn.Module] = []
        layers += mk.block(mk.conv(channels, 64), 64, pool=False, conv=True)
        layers += mk.block(mk.conv(64, 64), 64, pool=True, conv=True)
        layers += mk.block(mk.conv(64, 128), 128, pool=False, conv=True)
        layers += mk.block(mk.conv(128, 128), 128, pool=True, conv=True)
        layers.append(nn.Flatten())
        layers += mk.block(mk.linear(flat, 256), 256, pool=False, conv=False)
        layers += mk.block(mk.linear(256, 256), 256, pool=False, conv=False)
        layers.append(mk.linear(256, self.num_classes))
        self.net = nn.Sequential(*layers)


class MPTMLP(MPTNet):
    """784-200-200-classes MLP without biases, built from supermask or binary layers."""

    arch = "mlp"

    def __init__(
        self,
        in_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        variant: str = "mpt-1/32",
        prune_ratio: float = 0.8,
        seed: int = 0,
        weight_init: str = "signed_constant",
        hidden: int = 200,
    ) -> None:
        super().__init__(in_shape, num_classes, variant, prune_ratio, seed, weight_init)
        self.hidden = int(hidden)
        n_in = int(np.prod(self.in_shape))
        mk = _Layers(variant, prune_ratio, seed, weight_init)
        layers: list[nn.Module] = [nn.Flatten()]
        layers += mk.block(mk.linear(n_in, hidden), hidden, pool=False, conv=False)
        layers += mk.block(mk.linear(hidden, hidden), hidden, pool=False, conv=False)
        layers.append(mk.linear(hidden, self.num_classes))
        self.net = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden}


ARCHS: dict[str, type[MPTNet]] = {"conv4": MPTConv4, "mlp": MPTMLP}


def build_mpt(arch: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, **kwargs: Any) -> MPTNet:
    """MPTConv4 / MPTMLP by architecture name; kwargs: variant, prune_ratio, seed, weight_init (, hidden)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown MPT architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch](tuple(in_shape), int(num_classes), **kwargs)


# ----------------------------------------------------------------------------- mask files


def to_mask_file(model: MPTNet, model_name: str | None = None, meta: dict | None = None) -> MaskFile:
    """The trained model as a 1-bit file: for MPT the masks, per-layer alphas and seed; for
    the BNN baseline the signs of the latent weights and alpha = mean|w| per layer (what its
    forward uses); for 1/1 variants also the BatchNorm statistics."""
    if not isinstance(model, MPTNet):
        raise ConfigError("only MPT supermask and BNN models (models.mpt_nets) have a 1-bit file")
    if model.variant.startswith("mpt"):
        bits = "mask"
        masks = model_masks(model)
        alphas = layer_alphas(model)
        layers = [
            LayerInfo(name, layer.weight_shape, layer.frozen.index, int(masks[name].sum()), float(alphas[name]))
            for name, layer in supermask_layers(model)
        ]
    else:
        bits = "sign"
        masks, layers = OrderedDict(), []
        for i, (name, layer) in enumerate(binary_weight_layers(model)):
            w = layer.weight.detach().cpu()
            masks[name] = (w >= 0).numpy()
            layers.append(LayerInfo(name, tuple(w.shape), i, w.numel(), float(w.abs().mean())))
    extras: OrderedDict[str, np.ndarray] = OrderedDict(
        (name, buf.detach().cpu().float().numpy().copy())
        for name, buf in model.named_buffers()
        if buf.is_floating_point()
    )
    cfg = model.config()
    return MaskFile(
        model=model_name or model.registry_name,
        variant=model.variant,
        prune_ratio=model.prune_ratio if bits == "mask" else 0.0,
        seed=model.seed,
        in_shape=model.in_shape,
        num_classes=model.num_classes,
        weight_init=model.weight_init,
        layers=layers,
        masks=masks,
        extras=extras,
        meta={"arch": model.arch, **({"hidden": cfg["hidden"]} if "hidden" in cfg else {}), **_rule_meta(model),
              **(meta or {})},
        bits=bits,
    )


def _rule_meta(model: MPTNet) -> dict[str, str]:
    """{"mask_rule": "sample"} for a FedPM model (its masks keep any number of weights), else {}."""
    rules = {layer.mask_rule for _, layer in supermask_layers(model)}
    return {"mask_rule": SAMPLE} if SAMPLE in rules else {}


def save_mask_file(model: MPTNet, path: str | os.PathLike, model_name: str | None = None) -> int:
    """Write the model's mask file; returns its size in bytes."""
    return to_mask_file(model, model_name).save(path)


def build_from_mask_file(src: str | os.PathLike | bytes | MaskFile, dense: bool = False) -> nn.Module:
    """Rebuild a model from a 1-bit file: for masks, frozen weights from the seed and scores
    from the masks; for signs (BNN), latent weights alpha * (+-1), which the BNN forward maps
    back to exactly those binary weights.

    Returns the model in eval mode (its forward reproduces the saved bits exactly),
    or with ``dense=True`` the materialised plain torch model.
    """
    mf = src if isinstance(src, MaskFile) else load_mask_file(src)
    arch = str(mf.meta.get("arch") or mf.model.split("-")[0])
    kwargs: dict[str, Any] = {"variant": mf.variant, "seed": mf.seed, "weight_init": mf.weight_init}
    if mf.bits == "mask":
        kwargs["prune_ratio"] = mf.prune_ratio
    if arch == "mlp" and "hidden" in mf.meta:
        kwargs["hidden"] = int(mf.meta["hidden"])
    if mf.bits == "sign" and not mf.variant.startswith("bnn"):
        raise MaskFileError(f"a sign file holds a BNN model, not variant {mf.variant!r}")
    model = build_mpt(arch, mf.in_shape, mf.num_classes, **kwargs)
    layers = OrderedDict(supermask_layers(model) if mf.bits == "mask" else binary_weight_layers(model))
    if [l.name for l in mf.layers] != list(layers):
        raise MaskFileError(f"mask file layers {[l.name for l in mf.layers]} do not match the model's {list(layers)}")
    if mf.bits == "sign":
        with torch.no_grad():
            for info in mf.layers:
                weight = layers[info.name].weight
                if tuple(info.shape) != tuple(weight.shape):
                    raise MaskFileError(f"layer {info.name!r}: file has shape {info.shape}, model has {tuple(weight.shape)}")
                signs = torch.from_numpy(np.asarray(mf.masks[info.name], dtype=np.bool_))
                weight.copy_(torch.where(signs, info.alpha, -info.alpha))
        return _with_extras(model, mf, dense)
    sampled = mf.meta.get("mask_rule") == SAMPLE
    if sampled:  # FedPM: the mask is scores > 0, so scores +-1 reproduce it (any number kept)
        use_sampled_masks(model)
    for info in mf.layers:
        layer = layers[info.name]
        if tuple(info.shape) != layer.weight_shape or info.index != layer.frozen.index or (
                info.kept != layer.kept and not sampled):
            raise MaskFileError(
                f"layer {info.name!r}: file has shape {info.shape}, index {info.index}, kept {info.kept}; "
                f"model has {layer.weight_shape}, {layer.frozen.index}, {layer.kept}"
            )
    if sampled:
        set_scores(model, {k: np.where(np.asarray(m, dtype=np.bool_), 1.0, -1.0) for k, m in mf.masks.items()})
    else:
        set_scores_from_masks(model, mf.masks)
    for info in mf.layers:
        alpha = layers[info.name].alpha()
        if not np.isclose(alpha, info.alpha, rtol=1e-5, atol=0):
            raise MaskFileError(f"layer {info.name!r}: alpha {alpha} from the rebuilt weights, file says {info.alpha}")
    return _with_extras(model, mf, dense)


def _with_extras(model: MPTNet, mf: MaskFile, dense: bool) -> nn.Module:
    """Load the file's float buffers (BatchNorm statistics) and hand back the eval-mode model."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, arr in mf.extras.items():
            if name not in buffers:
                raise MaskFileError(f"extra tensor {name!r} is not a buffer of the model")
            buffers[name].copy_(torch.from_numpy(arr).to(buffers[name].dtype))
    model.eval()
    return materialize(model) if dense else model


__all__ = [
    "ARCHS",
    "MPTConv4",
    "MPTMLP",
    "MPTNet",
    "REGISTRY_NAMES",
    "VARIANTS",
    "build_from_mask_file",
    "build_mpt",
    "save_mask_file",
    "to_mask_file",
]
