"""Task families: what a model's output means, so its loss and metrics come from one place.

A model names its family in registry.py; the trainer (edge_agent/trainer.py) minimises the
family's `loss`, and evaluation (models/evaluate.py) sums the family's per-batch `counts` over
the whole set and turns them into metrics with `metrics`. Nothing else assumes classification.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

Counts = dict[str, float]


@dataclass(frozen=True)
class Family:
    """How to train and score one kind of model output.

    loss(logits, target): the mean loss that training minimises.
    hits(logits, target): (right, scored) predictions of one batch, the trainer's running score
        (examples for classification, pixels for segmentation).
    counts(logits, target): one batch's sums ('loss_sum', 'n' and the metric's counts); they are
        added over all batches, so metrics cover the whole set, not a mean of batch metrics.
    metrics(counts): the evaluation's metrics from the summed counts, always with 'loss'.
    headline: the metric a run's summary and plots lead with."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hits: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]]
    counts: Callable[[torch.Tensor, torch.Tensor], Counts]
    metrics: Callable[[Mapping[str, float]], dict[str, float]]
    headline: str


# --- classification: one logit per class, integer labels --------------------------------------

def _cls_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def _cls_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    return int((logits.argmax(1) == y).sum()), len(y)


def _cls_counts(logits: torch.Tensor, y: torch.Tensor) -> Counts:
    return {"loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
            "correct": int((logits.argmax(1) == y).sum()), "n": len(y)}


def _cls_metrics(c: Mapping[str, float]) -> dict[str, float]:
    """Mean cross-entropy per example and accuracy in [0, 1]; an empty set divides by 1."""
    n = max(1, int(c.get("n", 0)))
    return {"loss": c.get("loss_sum", 0.0) / n, "accuracy": c.get("correct", 0) / n}


# --- segmentation: one logit per pixel, a binary mask of the positive class (e.g. change) ---------

def _as_mask(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The target as a float mask of the logits' shape ((N, H, W) masks fit (N, 1, H, W) logits)."""
    if y.numel() != logits.numel():
        raise ConfigError(f"segmentation target has {y.numel()} values for {logits.numel()} logits "
                          f"(target shape {tuple(y.shape)}, output shape {tuple(logits.shape)})")
    return y.reshape(logits.shape).to(logits.dtype)


def _seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, _as_mask(logits, y))


def _seg_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    return int(((logits > 0) == (_as_mask(logits, y) > 0.5)).sum()), logits.numel()


def _seg_counts(logits: torch.Tensor, y: torch.Tensor) -> Counts:
    mask = _as_mask(logits, y)
    pred, true = logits > 0, mask > 0.5  # logit > 0 <=> probability > 0.5
    return {"loss_sum": float(F.binary_cross_entropy_with_logits(logits, mask, reduction="sum")),
            "pixels": logits.numel(), "n": len(logits),
            "tp": int((pred & true).sum()), "fp": int((pred & ~true).sum()), "fn": int((~pred & true).sum())}


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def segmentation_metrics(c: Mapping[str, float]) -> dict[str, float]:
    """Loss (mean binary cross-entropy per pixel) and precision, recall, F1 and IoU of the
    positive class from TP/FP/FN summed over the whole set.

    Zero-division conventions: a ratio whose denominator is 0 is 1.0 when nothing positive was
    there to be found nor predicted (TP = FP = FN = 0: a perfect answer on an all-negative set),
    and 0.0 otherwise. So precision with no positive prediction is 1.0 if the truth is empty
    too, else 0.0 (TP = 0 and FN > 0 already make recall 0); recall with an empty truth is 1.0
    only if nothing was predicted; F1 = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN)
    follow the same rule."""
    tp, fp, fn = float(c.get("tp", 0)), float(c.get("fp", 0)), float(c.get("fn", 0))
    empty = 1.0 if tp + fp + fn == 0 else 0.0
    return {"loss": c.get("loss_sum", 0.0) / max(1, int(c.get("pixels", 0))),
            "precision": _ratio(tp, tp + fp, empty), "recall": _ratio(tp, tp + fn, empty),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty), "iou": _ratio(tp, tp + fp + fn, empty)}


CLASSIFICATION = Family("classification", loss=_cls_loss, hits=_cls_hits, counts=_cls_counts,
                        metrics=_cls_metrics, headline="accuracy")
SEGMENTATION = Family("segmentation", loss=_seg_loss, hits=_seg_hits, counts=_seg_counts,
                      metrics=segmentation_metrics, headline="f1")

FAMILIES: dict[str, Family] = {f.name: f for f in (CLASSIFICATION, SEGMENTATION)}


def get_family(name: str) -> Family:
    """The registered family `name`, or a ConfigError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}") from None
