"""The numpy twin of models.supermask.materialize: the wire tensors of an MPT or BNN model ->
the dense weights its ONNX graph template takes, without torch.

The wire carries what trains: MPT scores (plus BatchNorm running statistics for 1/1
variants) or BNN latent weights, never the dense weights a graph multiplies with. Each model's
graph template (models/onnx_templates/) holds a *recipe*, read off the torch model when the
template was built, saying how each dense tensor comes from the wire tensors:

* ``{"op": "copy", "from": NAME}`` (also what a tensor without a recipe gets): the wire tensor
  itself (dense weights, biases, BatchNorm statistics);
* ``{"op": "supermask", "from": SCORES, "index": i, "binarize": b, "weight_init": init}``: an MPT
  layer's effective weight ``alpha * sign(W) * m``, ``m`` the top ``keep_count(numel, prune_ratio)``
  |scores| (ties to the lower index, bits.topk_mask, the rule the torch layers use) and ``W``
  regenerated from (seed, i) (bits.frozen_weight);
  With ``"mask_rule": "sample"`` (a FedPM layer, models/supermask/fedpm.py) ``m`` is scores > 0
  and no prune ratio is needed;
* ``{"op": "sign", "from": LATENT}``: a BNN layer's weight ``sign(w) * mean|w|`` (sign(0) = +1).

The model-wide options ``prune_ratio`` and ``seed`` come with the call (the message header's
``model_options`` over the registry defaults the template lists; the seed picks the frozen
weights, as models/bits.py does for the torch layers). For the default signed-constant weights the result is
bit-identical to torch's materialize (alpha * sign(W) is W itself); for kaiming-normal weights and
BNN layers alpha is a float sum, equal to torch's up to float rounding. tests/test_onnx_templates.py
checks both against torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .bits import frozen_weight, keep_count, topk_mask
from .errors import ConfigError, ModelFileError

OPS = ("copy", "supermask", "sign")


class MaterialiseError(ModelFileError):
    """A recipe or wire tensor the materialiser cannot use; the text names the tensor."""


def supermask_weight(
    scores: np.ndarray, seed: int, index: int, prune_ratio: float, binarize: bool = True,
    weight_init: str = "signed_constant", mask_rule: str = "topk",
) -> np.ndarray:
    """Effective float32 weight of MPT layer `index`: what SupermaskLayer.dense_weight() returns
    (mask_rule "sample", a FedPM layer: the mask is scores > 0 and prune_ratio is unused)."""
    scores = np.asarray(scores, dtype=np.float32)
    w = frozen_weight(seed, index, scores.shape, weight_init)
    mask = scores > 0 if mask_rule == "sample" else topk_mask(scores, keep_count(w.size, prune_ratio))
    if binarize and weight_init != "signed_constant":  # signed constants: alpha * sign(W) is W itself
        alpha = np.float32(np.abs(w)[mask].sum(dtype=np.float64) / max(1, int(np.count_nonzero(mask))))
        w = np.where(w >= 0, alpha, -alpha).astype(np.float32)
    return w * mask


def sign_weight(latent: np.ndarray) -> np.ndarray:
    """A BNN layer's binary weight sign(w) * mean|w| (BinaryWeightLayer.dense_weight())."""
    latent = np.asarray(latent, dtype=np.float32)
    alpha = np.float32(np.abs(latent).mean(dtype=np.float64))
    return np.where(latent >= 0, alpha, -alpha).astype(np.float32)


def materialise(
    recipe: Mapping[str, Mapping[str, Any]], wire: Mapping[str, np.ndarray], names: Iterable[str],
    options: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """The dense tensors `names` from the wire tensors, by `recipe` (dense name -> how it is made).

    `options`: ``prune_ratio`` and ``seed`` for supermask layers. Raises MaterialiseError naming
    the tensor or option that does not work."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        spec = recipe.get(name, {"op": "copy", "from": name})
        op, source = spec.get("op"), str(spec.get("from", name))
        if op not in OPS:
            raise MaterialiseError(f"dense tensor {name!r}: unknown recipe op {op!r} (known: {', '.join(OPS)})")
        if source not in wire:
            raise MaterialiseError(f"dense tensor {name!r} needs wire tensor {source!r}, which the message lacks")
        arr = np.asarray(wire[source], dtype=np.float32)
        if op == "copy":
            out[name] = arr
        elif op == "sign":
            out[name] = sign_weight(arr)
        else:
            rule = str(spec.get("mask_rule", "topk"))
            for key in ("prune_ratio", "seed") if rule == "topk" else ("seed",):
                if key not in options:
                    raise MaterialiseError(f"supermask layer {source!r} needs the model option {key!r}")
            try:
                out[name] = supermask_weight(arr, int(options["seed"]), int(spec["index"]),
                                             float(options.get("prune_ratio", 0.0)), bool(spec.get("binarize", True)),
                                             str(spec.get("weight_init", "signed_constant")), rule)
            except (ConfigError, ValueError, TypeError, KeyError) as exc:
                raise MaterialiseError(f"supermask layer {source!r}: {exc}") from None
    return out


__all__ = ["OPS", "MaterialiseError", "materialise", "sign_weight", "supermask_weight"]
