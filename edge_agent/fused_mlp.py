"""Autograd-free local training of a plain MLP (Flatten, Linear+bias, ReLU, ..., Linear).

A small MLP's CPU step is dominated by overhead, not arithmetic: autograd's graph, the
module calls, the optimiser's bookkeeping. Here the forward, the cross-entropy gradient and
the backward are written out as a few torch.addmm / torch.mm calls on the model's own
parameter tensors, and the optimiser update (SGD with momentum and weight decay, Adam,
FedProx's proximal term) is edge_agent/optimiser.py's, all under torch.no_grad.

It is the same computation as LocalTrainer.train's autograd loop, so the result is the same
within float rounding: the same seeded data order (one torch.Generator, one randperm per
epoch), the same per-batch mean cross-entropy (a partial last batch is the mean over its
own rows), the same optimiser update rules (edge_agent/optimiser.py), the same running
loss and accuracy, and after_step after every step. `fused_reason` refuses what it cannot
reproduce; LocalTrainer.train uses it whenever it applies (one engine for the fleet's
workers and a real agent alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedge.models.families import CLASSIFICATION, Family
from fedge.models.nets import MLP, SplitMLP

from .optimiser import adam_update, sgd_update

if TYPE_CHECKING:  # trainer.py imports this module
    from .trainer import TrainConfig

#: model classes whose forward is their leaf modules applied in registration order
_CHAINS: tuple[type[nn.Module], ...] = (MLP, SplitMLP, nn.Sequential)


def linear_chain(model: nn.Module) -> list[nn.Linear] | str:
    """The Linear layers of `model` in forward order when it is Flatten? (Linear ReLU)* Linear,
    every Linear with a bias and trainable; else why not (a string)."""
    if type(model) not in _CHAINS:
        return f"model class {type(model).__name__} is not a plain MLP"
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    if any(True for _ in model.buffers()):
        return "model has buffers"
    if leaves and isinstance(leaves[0], nn.Flatten):
        if leaves[0].start_dim != 1 or leaves[0].end_dim != -1:
            return "Flatten other than dims 1..-1"
        leaves = leaves[1:]
    linears: list[nn.Linear] = []
    for i, leaf in enumerate(leaves):
        want_linear = i % 2 == 0
        if want_linear:
            if type(leaf) is not nn.Linear:
                return f"layer {i} is {type(leaf).__name__}, not Linear"
            if leaf.bias is None:
                return "Linear without bias"
            if not (leaf.weight.requires_grad and leaf.bias.requires_grad):
                return "frozen Linear parameters"
            linears.append(leaf)
        elif type(leaf) is not nn.ReLU:
            return f"layer {i} is {type(leaf).__name__}, not ReLU"
    if not linears or len(leaves) % 2 == 0:
        return "model does not end with a Linear layer"
    params = {id(p) for p in model.parameters()}
    if params != {id(p) for lin in linears for p in (lin.weight, lin.bias)}:
        return "model has parameters outside its Linear layers"
    return linears


def fused_reason(model: nn.Module, family: Family, cfg: TrainConfig) -> str | None:
    """None when train_fused reproduces LocalTrainer.train for this model, family and config;
    else the reason it cannot."""
    if family.name != CLASSIFICATION.name:
        return f"family {family.name!r}: only classification (cross-entropy) is fused"
    if cfg.optimizer not in ("sgd", "adam"):
        return f"optimizer {cfg.optimizer!r}"
    if cfg.batch_size < 1:
        return f"batch_size {cfg.batch_size} is below 1"
    chain = linear_chain(model)
    return chain if isinstance(chain, str) else None


def train_fused(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int,
                after_step: Callable[[float], None] | None = None,
                start: float | None = None) -> tuple[float, int, int, int]:
    """Train `model` (fused_reason(...) is None) in place on (x, y) as LocalTrainer.train
    would; returns (summed batch loss * batch size, right, seen, scored)."""
    start = time.perf_counter() if start is None else start
    linears = linear_chain(model)
    assert not isinstance(linears, str), linears
    device = linears[0].weight.device
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    with torch.no_grad():
        return _loop(linears, params, x.reshape(len(x), -1), y, device, cfg, seed, after_step, start)


class _Scratch:
    """One step's tensors for a batch of `rows`, made once per batch size (a job has at most two:
    full batches and its last partial one), so a step allocates (almost) nothing."""

    def __init__(self, rows: int, weights: list[torch.Tensor], device: torch.device) -> None:
        dtype = weights[0].dtype
        self.x = torch.empty(rows, weights[0].shape[1], dtype=dtype)  # gathered on the CPU, then moved
        self.y = torch.empty(rows, dtype=torch.long)
        self.out = [torch.empty(rows, w.shape[0], dtype=dtype, device=device) for w in weights]  # layer outputs
        self.logp = torch.empty_like(self.out[-1])
        self.picked = torch.empty_like(self.out[-1])
        self.dlogits = torch.empty_like(self.out[-1])
        self.dins = [torch.empty(rows, w.shape[1], dtype=dtype, device=device) for w in weights[1:]]
        self.labels = torch.empty(rows, 1, dtype=torch.long, device=device)


def _step(weights: list[torch.Tensor], biases: list[torch.Tensor], grads: list[torch.Tensor], s: _Scratch,
          xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, mean cross-entropy and backward of one batch into `grads` (params' order:
    dW0, db0, dW1, ...); returns (loss, right predictions) as 0-d tensors."""
    rows = len(yb)
    h = xb
    last = len(weights) - 1
    for k in range(last + 1):
        h = torch.addmm(biases[k], h, weights[k].t(), out=s.out[k])
        if k < last:
            h.relu_()
    logp = torch._log_softmax(h, 1, False, out=s.logp)
    loss = F.nll_loss(logp, yb)
    hits = (h.argmax(1) == yb).sum()
    # the gradient by the kernels autograd runs (nll_loss's -1/rows at the label, then
    # log_softmax's backward; addmm's weight gradient is grad.t() @ input for a transposed
    # weight; ReLU's threshold_backward), so the float rounding is the same too: an own
    # softmax - onehot differed by an ulp, which momentum grew to ~5e-4 over paper001's 188
    # steps (a ReLU flipped)
    s.labels.copy_(yb.unsqueeze(1))
    s.picked.zero_().scatter_(1, s.labels, -1.0 / rows)
    g = torch.ops.aten._log_softmax_backward_data.out(s.picked, logp, 1, logp.dtype, out=s.dlogits)
    for k in range(last, -1, -1):
        torch.mm(g.t(), xb if k == 0 else s.out[k - 1], out=grads[2 * k])
        torch.sum(g, 0, out=grads[2 * k + 1])
        if k > 0:
            g = torch.mm(g, weights[k], out=s.dins[k - 1])
            g = torch.ops.aten.threshold_backward.grad_input(g, s.out[k - 1], 0, grad_input=g)
    return loss, hits


def _loop(linears: list[nn.Linear], params: list[torch.Tensor], xf: torch.Tensor, y: torch.Tensor,
          device: torch.device, cfg: TrainConfig, seed: int, after_step: Callable[[float], None] | None,
          start: float) -> tuple[float, int, int, int]:
    weights = [lin.weight.data for lin in linears]
    biases = [lin.bias.data for lin in linears]
    plist = [p.data for p in params]
    grads = [torch.empty_like(p) for p in plist]  # dW0, db0, dW1, db1, ... (params' order)
    adam = cfg.optimizer == "adam"
    momentum = 0.0 if adam else cfg.momentum
    bufs: list[torch.Tensor] | None = None  # SGD momentum buffers, made on the first step as torch does
    exp_avg = [torch.zeros_like(p) for p in plist] if adam else []
    exp_avg_sq = [torch.zeros_like(p) for p in plist] if adam else []
    anchors = [p.clone() for p in plist] if cfg.proximal_mu > 0 else None
    scratch: dict[int, _Scratch] = {}
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    xf, y = xf.to(weights[0].dtype), y.to(torch.long)
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for begin in range(0, n, cfg.batch_size):
            idx = order[begin : begin + cfg.batch_size]
            rows = len(idx)
            s = scratch.get(rows) or scratch.setdefault(rows, _Scratch(rows, weights, device))
            xb = torch.index_select(xf, 0, idx, out=s.x).to(device)
            yb = torch.index_select(y, 0, idx, out=s.y).to(device)
            loss, hits = _step(weights, biases, grads, s, xb, yb)
            if anchors is not None:  # FedProx: d/dp mu/2 ||p - a||^2 = mu (p - a)
                drift = torch._foreach_sub(plist, anchors)
                torch._foreach_add_(grads, drift, alpha=cfg.proximal_mu)
            steps += 1
            if adam:
                adam_update(plist, grads, exp_avg, exp_avg_sq, [steps] * len(plist), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
            else:
                bufs = sgd_update(plist, grads, bufs, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)
            total_loss += float(loss) * rows
            correct += int(hits)
            seen += rows
            if after_step is not None:
                after_step(time.perf_counter() - start)
    return total_loss, correct, seen, seen
