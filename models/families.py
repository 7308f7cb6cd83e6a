"""Task families: what a model's output means, so its loss and metrics come from one place.

A model names its family in registry.py. The trainer (edge_agent/trainer.py) calls the
family's `step` on every batch; evaluation (models/evaluate.py) calls its `evaluate` on the
whole set; the hub's round records, run.json, the plots and the stop rule lead with its
`headline` metric. Nothing else assumes classification.

Most families are a `PerBatchFamily`: a loss of the model's output and per-batch counts
summed over the set (classification, segmentation). A family whose loss needs the model
itself, or whose metrics need the whole set at once, implements `step` and `evaluate`
directly: `ContrastiveFamily` (two augmented views per batch; a linear probe on all
embeddings).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

Counts = dict[str, float]
Step = tuple[torch.Tensor, int, int]  # (the loss to minimise, right predictions, scored predictions)


class Family(ABC):
    """How to train and score one kind of model output.

    headline: the metric a run's summary, plots and target stop rule lead with; it is one of
        `metric_names`, and higher is better.
    metric_names: every key `evaluate` returns, 'loss' first."""

    name: str
    headline: str
    metric_names: tuple[str, ...]

    @abstractmethod
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Step:
        """One training batch: (loss to minimise, right, scored). right / scored summed over a
        job is the trainer's running score (TrainResult.accuracy). `gen` is the job's seeded
        generator, for a family that draws random numbers (augmentations): a job is
        reproducible from its seed."""

    @abstractmethod
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
        """The metrics (`metric_names`) of `model` on the whole set, forwarding at most
        `batch_size` examples at a time. Called through models.evaluate.evaluate, which sets
        eval mode and turns gradients off; deterministic for the same model and set."""


@dataclass(frozen=True)
class PerBatchFamily(Family):
    """A family made of per-batch functions of the model's output (`logits`).

    loss(logits, target): the mean loss that training minimises.
    hits(logits, target): (right, scored) predictions of one batch, the trainer's running score
        (examples for classification, pixels for segmentation).
    counts(logits, target): one batch's sums ('loss_sum', 'n' and the metric's counts); they are
        added over all batches, so metrics cover the whole set, not a mean of batch metrics.
    metrics(counts): the evaluation's metrics from the summed counts, always with 'loss'."""

    name: str
    headline: str
    metric_names: tuple[str, ...]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hits: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]]
    counts: Callable[[torch.Tensor, torch.Tensor], Counts]
    metrics: Callable[[Mapping[str, float]], dict[str, float]]

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Step:
        logits = model(x)
        return (self.loss(logits, y), *self.hits(logits, y))

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for start in range(0, len(x), batch_size):
            counts = self.counts(model(x[start : start + batch_size]), y[start : start + batch_size])
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
        return self.metrics(totals)


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


CLASSIFICATION = PerBatchFamily("classification", headline="accuracy", metric_names=("loss", "accuracy"),
                                loss=_cls_loss, hits=_cls_hits, counts=_cls_counts, metrics=_cls_metrics)
SEGMENTATION = PerBatchFamily("segmentation", headline="f1", metric_names=("loss", "precision", "recall", "f1", "iou"),
                              loss=_seg_loss, hits=_seg_hits, counts=_seg_counts, metrics=segmentation_metrics)


# --- contrastive: an embedding trained without labels (SimCLR), scored by a linear probe ---------

def augment(x: torch.Tensor, gen: torch.Generator, shift: float = 0.15, flip: bool = True,
            jitter: float = 0.4, noise: float = 0.1) -> torch.Tensor:
    """A random view of each image of a batch [N, C, H, W] (greyscale or RGB, normalised):
    shifted by up to `shift` of its size in each direction (a random crop of the edge-padded
    image), mirrored left-right with probability 1/2, its intensity scaled by 1 +- `jitter`
    and offset by +- `jitter` (the same for all channels), plus Gaussian noise of std `noise`.
    Every random number comes from `gen` (on the CPU, then moved to x's device), so a view is
    reproducible from the generator's seed on any device."""
    if x.ndim != 4:
        raise ConfigError(f"contrastive views need images [N, C, H, W], got a batch of shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    ph, pw = round(shift * h), round(shift * w)
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
    mirror = torch.rand(n, generator=gen) < 0.5
    scale = 1 + jitter * (2 * torch.rand(n, generator=gen) - 1)
    offset = jitter * (2 * torch.rand(n, generator=gen) - 1)
    grain = noise * torch.randn(x.shape, generator=gen)
    dev = x.device
    padded = F.pad(x, (pw, pw, ph, ph), mode="replicate")
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(dev)  # [N, H]: the crop's rows in the padded image
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(dev)
    if flip:
        cols = torch.where(mirror.to(dev)[:, None], cols.flip(1), cols)  # a mirrored crop reads its columns backwards
    batch, channel = torch.arange(n, device=dev), torch.arange(x.shape[1], device=dev)
    view = padded[batch[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    per_image = (n, 1, 1, 1)
    return view * scale.to(dev, x.dtype).view(per_image) + offset.to(dev, x.dtype).view(per_image) + grain.to(dev, x.dtype)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """SimCLR's NT-Xent loss of two views' projections [N, D] (row i of z1 and of z2: one
    example): each of the 2N rows is an anchor whose positive is its other view and whose
    negatives are the other 2N - 2 rows, scored by cosine similarity / temperature; the loss
    is the mean cross-entropy over the 2N anchors. Also returns how many anchors have their
    positive as the most similar other row (the trainer's running score)."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positive), int((sim.argmax(1) == positive).sum())


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, ridge: float = 0.1, seed: int = 0) -> float:
    """How well a linear classifier on `features` [N, D] predicts integer `labels` [N]: fit on
    a seeded half of the set, scored on the other half.

    The classifier is closed-form ridge regression to one-hot targets on standardised features
    (mean and std of the fitted half) plus a bias, in float64 on the CPU: W = (A^T A +
    ridge * n_fit * I)^-1 A^T T, prediction argmax(A W). No training loop, no learning rate,
    no randomness beyond the seeded split: the same features always score the same."""
    if labels.ndim != 1 or labels.is_floating_point():
        raise ConfigError(f"the linear probe needs one integer class label per example, got labels of shape "
                          f"{tuple(labels.shape)} and type {labels.dtype}")
    n = len(features)
    if n < 2:
        raise ConfigError(f"the linear probe needs at least 2 labelled examples (one to fit, one to score), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = order[: (n + 1) // 2], order[(n + 1) // 2 :]
    f = features.detach().to("cpu", torch.float64).reshape(n, -1)
    y = labels.detach().to("cpu")
    mean, std = f[fit].mean(0), f[fit].std(0, unbiased=False).clamp_min(1e-8)
    a = torch.cat([(f - mean) / std, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    targets = F.one_hot(y[fit], int(y.max()) + 1).to(torch.float64)
    gram = a[fit].T @ a[fit] + ridge * len(fit) * torch.eye(a.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, a[fit].T @ targets)
    return float(((a[held] @ weights).argmax(1) == y[held]).to(torch.float64).mean())


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation a probe reads: `model.embed(x)` where the model has one (the encoder's
    output, before the projection head, as SimCLR evaluates), else the model's output."""
    method = getattr(model, "embed", None)
    return method(x) if callable(method) else model(x)


@dataclass(frozen=True)
class ContrastiveFamily(Family):
    """Self-supervised training (SimCLR): the model's output is a projection; each batch is
    seen as two augmented views (`augment`), and the NT-Xent loss (`nt_xent`) pulls an
    example's two views together and pushes the other examples' views away. Labels are not
    used in training.

    Evaluation: 'loss', the NT-Xent loss on the set in batches of min(batch_size, loss_batch)
    (the batch sets the number of negatives, so the loss is comparable only at one batch
    size; the views come from a generator seeded with `eval_seed`, the same each time), and
    'probe_accuracy', `linear_probe_accuracy` of the embeddings (`embed`) with the set's
    labels. The trainer's running score is the share of anchors whose nearest other view is
    their positive."""

    name: str = "contrastive"
    headline: str = "probe_accuracy"
    metric_names: tuple[str, ...] = ("loss", "probe_accuracy")
    temperature: float = 0.5
    shift: float = 0.15
    flip: bool = True
    jitter: float = 0.4
    noise: float = 0.1
    loss_batch: int = 256
    probe_ridge: float = 0.1
    eval_seed: int = 0

    def views(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Two augmented views of the batch, stacked: [2N, C, H, W]."""
        return torch.cat([augment(x, gen, self.shift, self.flip, self.jitter, self.noise) for _ in range(2)])

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Step:
        z = model(self.views(x, gen))  # one forward of both views
        loss, right = nt_xent(z[: len(x)], z[len(x) :], self.temperature)
        return loss, right, 2 * len(x)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.eval_seed)
        chunk = max(1, min(batch_size, self.loss_batch))
        loss_sum = 0.0
        for start in range(0, len(x), chunk):
            xb = x[start : start + chunk]
            z = model(self.views(xb, gen))
            loss_sum += float(nt_xent(z[: len(xb)], z[len(xb) :], self.temperature)[0]) * len(xb)
        chunks = [embed(model, x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        features = torch.cat(chunks) if chunks else x.new_zeros(0, 1)  # an empty set: the probe says why it cannot score
        return {"loss": loss_sum / max(1, len(x)),
                "probe_accuracy": linear_probe_accuracy(features, y, self.probe_ridge, self.eval_seed)}


CONTRASTIVE = ContrastiveFamily()

FAMILIES: dict[str, Family] = {f.name: f for f in (CLASSIFICATION, SEGMENTATION, CONTRASTIVE)}

#: how plots and summaries name a metric (a metric not here is shown by its key)
METRIC_LABELS = {"accuracy": "accuracy", "f1": "F1", "iou": "IoU", "precision": "precision", "recall": "recall",
                 "probe_accuracy": "linear-probe accuracy", "loss": "loss"}


def get_family(name: str) -> Family:
    """The registered family `name`, or a ConfigError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}") from None
