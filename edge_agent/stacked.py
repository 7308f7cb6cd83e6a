"""Local training of a group of devices of one architecture at once ("stacked").

A fleet simulator trains many virtual devices, each a short local-SGD job from the same
global model on its own small partition. One by one (LocalTrainer.train), every step pays
Python and dispatch overhead for a tiny batch. Here the group's parameters are stacked along
a new leading dimension and every step is one batched forward/backward for all devices
(torch.func.functional_call under torch.func.vmap), followed by one stacked optimiser update.

Each device keeps what makes its job its own, so the result equals LocalTrainer.train of each
job (within float tolerance): its own data order (the same seeded torch.randperm per epoch),
its own number of steps, its own optimiser state. Devices are sorted by step count, so the
devices still training at a step are a prefix of the stack: a device whose data is done
stops stepping (no parameter, momentum or Adam change) and costs nothing. A device's last
partial batch is filled up to the batch shape with rows of weight 0, so its loss and
gradient are the mean over its real samples only.

"Equal" is within float rounding: on 1 thread the trained tensors match to ~1e-8 after
hundreds of steps; with more threads the batched kernels may sum in another order, and a
ReLU whose input sits within rounding of 0 then flips, which moved one device of paper001's
6,000-image job by up to ~1e-3 (the same happens to LocalTrainer.train on another machine).
A hand-written torch.baddbmm forward for the Linear-only MLP was no clear gain over vmap
(4-9 ms vs 6-15 ms per step, within the shared machine's noise), so vmap serves every model.

What cannot be made equal is refused by `stackable` with its reason; `prefer_stacked` says
when stacking is also faster (benchmarks/stacked_training.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedge.models.errors import ConfigError
from fedge.models.families import CLASSIFICATION, Family
from fedge.models.supermask import BinaryActivation, BinaryWeightLayer, SupermaskLayer

from .fused_mlp import fused_reason
from .optimiser import adam_update, sgd_update
from .trainer import TrainConfig, TrainResult


@dataclass
class StackJob:
    """One device's job: what LocalTrainer.train would get for it."""

    state: Mapping[str, np.ndarray]  # full model state to start from ({**state, **private} of LocalTrainer.train)
    x: torch.Tensor  # this device's data
    y: torch.Tensor
    seed: int  # LocalTrainer.train's seed: the device's torch.Generator (its data order)


# Leaf modules whose forward is a pure function of their parameters and input (no buffers, no
# random numbers, no custom autograd): torch.func batches them over the stacked parameters.
_PURE_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Flatten,
    nn.MaxPool2d, nn.AvgPool2d, nn.Identity,
)


def _module_reason(name: str, module: nn.Module) -> str | None:
    """Why `module` (a leaf, or a module with its own parameters) cannot be stacked, else None."""
    kind = type(module).__name__
    where = f"module {name or '(root)'} ({kind})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{where}: BatchNorm buffers (running statistics) change in train mode"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return f"{where}: dropout draws from torch's global random generator"
    if isinstance(module, (SupermaskLayer, BinaryWeightLayer, BinaryActivation)):
        return (f"{where}: supermask/binary layers train through custom autograd functions (top-k mask, "
                f"straight-through estimators) that torch.func cannot transform (no setup_context)")
    if not isinstance(module, _PURE_LEAVES):
        return f"{where}: not a layer known to be pure under torch.func.vmap"
    return None


def stackable(model: nn.Module, family: Family, cfg: TrainConfig) -> str | None:
    """None when train_stacked reproduces LocalTrainer.train for this model, family and config;
    else the reason it cannot (the first one found)."""
    if family.name != CLASSIFICATION.name:
        if family.name == "contrastive":
            return "contrastive family draws augmentations from each device's generator"
        return f"family {family.name!r}: only classification (cross-entropy per example) is stacked"
    if cfg.batch_size < 1:
        return f"batch_size {cfg.batch_size} is below 1"
    for name, module in model.named_modules():
        has_own_params = any(True for _ in module.parameters(recurse=False))
        if has_own_params or not any(True for _ in module.children()):
            reason = _module_reason(name, module)
            if reason is not None:
                return reason
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"model has buffers ({', '.join(buffers[:3])}) that training may change"
    if not any(p.requires_grad for p in model.parameters()):
        return "model has no trainable parameters"
    return None


#: fewest jobs worth stacking (benchmarks/stacked_training.py, 1 thread: 4 MLP jobs 0.89x, 8 jobs 0.93-1.31x,
#: 10 jobs 1.4x and more)
MIN_STACK_JOBS = 8


def prefer_stacked(model: nn.Module, family: Family, cfg: TrainConfig, n_jobs: int, fused: bool = True) -> bool:
    """Whether to train `n_jobs` jobs with train_stacked rather than one by one: stackable, at
    least MIN_STACK_JOBS of them, and no convolution on the CPU.

    From benchmarks/stacked_training.py on the 2-core CPU VM (docs/benchmarks.md; taken under
    load, ratios = one-by-one seconds / stacked seconds): MLPs gain from about 8 jobs up
    (paper001's 10 x 6,000 images 1.4x on 1 thread, 100 x 60 images 1.8x; 4 jobs 0.89x);
    Conv-4 loses (0.85x on 1 thread, 0.29x on 2): convolutions under vmap become grouped
    convolutions, slower on the CPU than one device at a time. On a GPU (one H200,
    benchmarks/results/stacked_training_cuda.json) stacking wins for every case: paper001
    3.4x, 100 x 60 images 5.8x, Conv-4 1.5x, so convolutions stack there.

    FUSED_NOTE: on the CPU a plain MLP that LocalTrainer.train trains autograd-free
    (`fused`, the trainer's setting, and fused_mlp.fused_reason is None) is not stacked: one by one, fused beat stacked in every
    MLP case of benchmarks/stacked_training.py (1 thread, loaded 2-core VM, same run;
    benchmarks/results/fused_training.json, docs/benchmarks.md)."""
    if n_jobs < MIN_STACK_JOBS or stackable(model, family, cfg) is not None:
        return False
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if fused and on_cpu and fused_reason(model, family, cfg) is None:
        return False  # one by one, LocalTrainer.train's fused MLP step is faster than a stack (see FUSED_NOTE)
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return not (has_conv and on_cpu)


#: devices' parameters one stack holds at most on the CPU (benchmarks/stacked_training.py):
#: beyond ~16-32 MiB each step's stacked gradients no longer come from the allocator's cache
#: (fresh pages every step) and a step of 50-100 MLPs cost 2-4x more per device than one of 10-20
CPU_STACK_BYTES = 16 * 2**20


def stack_size(model: nn.Module) -> int:
    """How many devices one stacked step trains: on the CPU as many as keep their parameters
    within CPU_STACK_BYTES (at least 1); elsewhere (a GPU) all of them."""
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        return 2**31 - 1
    per_device = sum(p.numel() * p.element_size() for p in params)
    return max(1, CPU_STACK_BYTES // max(1, per_device))


def train_stacked(model: nn.Module, family: Family, jobs: Sequence[StackJob], cfg: TrainConfig,
                  after_step: Callable[[float], None] | None = None, max_stack: int | None = None) -> list[TrainResult]:
    """Train every job of `jobs` (one device each) from its own start state, stacked: at most
    `max_stack` devices per stacked step (default stack_size(model)), a stack after another.

    Results equal (within float tolerance) LocalTrainer.train of each job one by one:
    TrainResult.state is the full state of the trained model (every float tensor of
    model.state_dict(), float32 numpy; the caller splits private tensors with
    registry.split_state, private is {}), loss is the mean over the samples seen, accuracy
    right/scored, seconds the whole call's wall time shared out in proportion to each job's
    samples. `model` is only the architecture's template: it is not changed.
    `after_step(elapsed seconds since the call began)` runs after every stacked step and may
    raise to stop training (the exception propagates)."""
    reason = stackable(model, family, cfg)
    if reason is not None:
        raise ConfigError(f"train_stacked cannot reproduce LocalTrainer.train here: {reason}")
    if max_stack is not None and max_stack < 1:
        raise ConfigError(f"max_stack must be at least 1, got {max_stack}")
    start = time.perf_counter()
    batches = [cfg.epochs * math.ceil(len(job.y) / cfg.batch_size) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -batches[i])  # similar lengths share a stack
    size = max_stack or stack_size(model)
    done: dict[int, _Trained] = {}
    for first in range(0, len(order), size):
        group = order[first : first + size]
        for i, trained in zip(group, _train_group(model, [jobs[i] for i in group], cfg, after_step, start)):
            done[i] = trained
    elapsed = time.perf_counter() - start
    samples = sum(len(job.y) for job in jobs)
    return [TrainResult(state=done[i].state, num_samples=len(job.y), loss=done[i].loss, accuracy=done[i].accuracy,
                        seconds=elapsed * (len(job.y) / samples if samples else 1 / len(jobs)), private={})
            for i, job in enumerate(jobs)]


@dataclass
class _Trained:
    state: dict[str, np.ndarray]
    loss: float
    accuracy: float


def _train_group(model: nn.Module, jobs: Sequence[StackJob], cfg: TrainConfig,
                 after_step: Callable[[float], None] | None, start: float) -> list[_Trained]:
    """One stack: `jobs` sorted by step count, longest first, so the devices still training at
    any step are a prefix of the stack (the others are simply not in that step)."""
    device = next(model.parameters()).device
    template = model.state_dict()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    fixed = [k for k in template if k not in trainable]
    steps = [cfg.epochs * math.ceil(len(job.y) / cfg.batch_size) for job in jobs]
    stack = {k: _stack_state(jobs, k, template[k], device) for k in template}
    index, weight = _schedule(jobs, cfg, device)
    x_all = torch.cat([job.x.to(device) for job in jobs])
    y_all = torch.cat([job.y.to(device) for job in jobs])
    opt = _StackedOptimiser(cfg, {k: stack[k] for k in trainable})

    def device_loss(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, (params, frozen), (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum(), logits  # w: 1/real samples, 0 for filler

    step_fn = vmap(grad_and_value(device_loss, has_aux=True))
    g = len(jobs)
    total_loss = torch.zeros(g, dtype=torch.float64)
    right = torch.zeros(g, dtype=torch.int64)
    seen = torch.zeros(g, dtype=torch.int64)
    for s in range(max(steps, default=0)):
        k = sum(1 for n in steps if n > s)
        idx, w = index[:k, s], weight[:k, s]
        real = w > 0
        grads, (loss, logits) = step_fn({n: stack[n][:k] for n in trainable}, {n: stack[n][:k] for n in fixed},
                                        x_all[idx], y_all[idx], w)
        opt.step(grads, k, s)
        count = real.sum(1).cpu()
        total_loss[:k] += loss.detach().cpu().to(torch.float64) * count
        right[:k] += ((logits.argmax(-1) == y_all[idx]) & real).sum(1).cpu()
        seen[:k] += count
        if after_step is not None:
            after_step(time.perf_counter() - start)
    keys = [k for k, v in template.items() if v.is_floating_point()]
    return [_Trained(state={k: stack[k][pos].detach().to("cpu", torch.float32).numpy().copy() for k in keys},
                     loss=float(total_loss[pos]) / max(1, int(seen[pos])),
                     accuracy=int(right[pos]) / max(1, int(seen[pos])))
            for pos in range(g)]


def _stack_state(jobs: Sequence[StackJob], key: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One tensor of every job's start state, stacked [G, ...] (as set_state loads it: float32
    numpy to the model's dtype); a job that lacks it is named."""
    parts = []
    for pos, job in enumerate(jobs):
        if key not in job.state:
            raise ConfigError(f"stacked job {pos} (seed {job.seed}): its state misses tensor {key!r}")
        arr = torch.from_numpy(np.asarray(job.state[key], dtype=np.float32))
        if tuple(arr.shape) != tuple(like.shape):
            raise ConfigError(f"stacked job {pos} (seed {job.seed}): tensor {key!r} has shape {tuple(arr.shape)}, "
                              f"the model's is {tuple(like.shape)}")
        parts.append(arr.to(like.dtype))
    return torch.stack(parts).to(device)


def _schedule(jobs: Sequence[StackJob], cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every device's batches as rows into the concatenated data: index [G, S, B] and weight
    [G, S, B] (1 / the batch's real samples for a real row, 0 for a filler row and for steps
    after the device's last), drawn exactly as LocalTrainer.train draws them: per epoch
    torch.randperm(n) from the device's generator, cut into batches that end with the epoch."""
    b = cfg.batch_size
    rows: list[torch.Tensor] = []
    offset = 0
    for job in jobs:
        n = len(job.y)
        gen = torch.Generator().manual_seed(job.seed)
        per_epoch = math.ceil(n / b)
        epochs = []
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            epochs.append(torch.cat([perm + offset, torch.full((per_epoch * b - n,), -1, dtype=perm.dtype)]))
        rows.append(torch.cat(epochs).view(-1, b) if epochs else torch.zeros(0, b, dtype=torch.int64))
        offset += n
    most = max(len(r) for r in rows)
    index = torch.full((len(jobs), most, b), -1, dtype=torch.int64)
    for pos, r in enumerate(rows):
        index[pos, : len(r)] = r
    real = index >= 0
    weight = real.to(torch.float32) / real.sum(-1, keepdim=True).clamp(min=1)
    return index.clamp(min=0).to(device), weight.to(device)


class _StackedOptimiser:
    """LocalTrainer.train's optimiser (edge_agent/optimiser.py: SGD with momentum, or Adam; L2
    weight decay) on stacked parameters. `step(grads, k, s)` updates the first k devices (those
    still training) at their step s + 1; the others' parameters and state are not touched.
    Devices all start at step 0 and stop for good, so a device's step counter is s + 1
    whenever it steps (Adam's bias correction), and the first k rows of the momentum buffers
    made at step 0 are the k devices'. FedProx adds mu (w - w_start) to the gradient: the
    gradient of mu/2 ||w - w_start||^2."""

    def __init__(self, cfg: TrainConfig, params: dict[str, torch.Tensor]) -> None:
        self.cfg, self.params = cfg, params
        self.adam = cfg.optimizer == "adam"
        self.anchor = {k: p.clone() for k, p in params.items()} if cfg.proximal_mu > 0 else {}
        self.bufs: list[torch.Tensor] | None = None  # SGD momentum, made at step 0 (rows: devices)
        self.moments = ([torch.zeros_like(p) for p in params.values()],
                        [torch.zeros_like(p) for p in params.values()]) if self.adam else None

    @torch.no_grad()
    def step(self, grads: Mapping[str, torch.Tensor], k: int, s: int) -> None:
        cfg = self.cfg
        params = [p_all[:k] for p_all in self.params.values()]
        g = [grads[name] for name in self.params]
        if cfg.proximal_mu > 0:
            g = [gi + cfg.proximal_mu * (p - self.anchor[name][:k]) for gi, p, name in zip(g, params, self.params)]
        if self.moments is not None:
            m, v = ([t[:k] for t in ts] for ts in self.moments)
            adam_update(params, g, m, v, [s + 1] * len(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
            return
        bufs = None if self.bufs is None else [b[:k] for b in self.bufs]
        new = sgd_update(params, g, bufs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if self.bufs is None:
            self.bufs = new
