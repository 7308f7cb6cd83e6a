"""Local training of one device's data, starting from the global model it was sent.

The trainer keeps its model object between rounds (only the weights are reloaded), so a
worker serving many virtual devices never rebuilds networks or data loaders.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedge.models.errors import ConfigError
from fedge.models.evaluate import evaluate
from fedge.models.families import CLASSIFICATION, Family
from fedge.models.registry import (
    build_model,
    count_parameters,
    get_state,
    is_private,
    model_family,
    model_spec,
    set_state,
    split_state,
)
from fedge.models.spec import ModelSpec
from fedge.models.supermask import model_masks
from fedge.models.wire.codecs import UPDATE_CARRIES

from .fused_mlp import fused_reason, train_fused
from .profile import Profile


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training job."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: adds mu/2 ||w - w_received||^2 to the loss (0: plain local SGD)

    @classmethod
    def resolve(cls, profile: Profile, task: Mapping[str, Any] | None) -> TrainConfig:
        """The hub's round settings win (paper 004), but never a batch above the profile's cap."""
        task = dict(task or {})
        return cls(
            epochs=int(task.get("epochs", profile.local_epochs)),
            batch_size=min(int(task.get("batch_size", profile.batch_size)), profile.batch_size),
            lr=float(task.get("lr", profile.lr)),
            optimizer=str(task.get("optimizer", profile.optimizer)),
            momentum=float(task.get("momentum", profile.momentum)),
            weight_decay=float(task.get("weight_decay", 0.0)),
            proximal_mu=float(task.get("proximal_mu", 0.0)),
        )


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    num_samples: int
    loss: float
    accuracy: float  # the family's running score: right / scored predictions (examples, pixels or contrastive views)
    seconds: float
    private: dict[str, np.ndarray] = field(default_factory=dict)  # trained private tensors: they stay here


def job_seed(base_seed: int, round_id: int, device_id: str) -> int:
    """Same seed for the same (run seed, round, device) on any machine or in any worker."""
    return (int(base_seed) * 1_000_003 + int(round_id) * 10_007 + zlib.crc32(device_id.encode())) % (2**31 - 1)


def estimate_training_mb(num_params: int, batch_size: int, in_numel: int, optimizer: str) -> float:
    """Rough resident estimate: weights + grads + optimiser state + a batch of activations."""
    copies = 4 if optimizer == "adam" else 3
    return (num_params * 4 * copies + batch_size * in_numel * 4 * 64) / 2**20


class LocalTrainer:
    """Holds one model instance and trains it on whatever partition a job brings."""

    def __init__(self, spec: ModelSpec | str, in_shape: tuple[int, ...], num_classes: int, device: str = "cpu",
                 fused: bool = True) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("profile asks for device 'cuda' but torch sees no CUDA GPU; use a cpu profile")
        self.device = torch.device(device)
        self.spec = model_spec(spec)
        self.model = build_model(self.spec, in_shape, num_classes).to(self.device)
        self.family = model_family(self.spec)  # its training step and metrics (families.FAMILIES)
        self.num_params = count_parameters(self.model)
        self.fused = fused  # train plain MLPs autograd-free (fused_mlp) where that gives the same result

    def train(
        self, state: Mapping[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int,
        after_step: Callable[[float], None] | None = None, private: Mapping[str, np.ndarray] | None = None,
    ) -> TrainResult:
        """Train the full model: the received (shared) `state` plus this device's `private`
        tensors (models with a private head, registry.split_state). `after_step(elapsed
        seconds)` runs after every step; it may raise to stop training (the agent's time
        budget, task_checks.time_budget)."""
        start = time.perf_counter()
        set_state(self.model, {**state, **(private or {})})
        model = self.model.train()
        if self.fused and fused_reason(model, self.family, cfg) is None:  # same result without autograd (fused_mlp)
            total, right, done, counted = train_fused(model, x, y, cfg, seed, after_step, start)
            return self._result(model, len(y), total, right, done, counted, start)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                          foreach=True)
        else:
            # foreach: one kernel per step for all tensors; torch picks it by default only on CUDA,
            # and per-tensor updates were ~15 % of a small MLP's CPU step (py-spy, paper001)
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  foreach=True)
        # FedProx's anchor: the weights as received; no term (and no copy) when mu is 0
        prox = (cfg.proximal_mu, params, [p.detach().clone() for p in params]) if cfg.proximal_mu > 0 else None
        gen = torch.Generator().manual_seed(seed)
        n = len(y)
        total_loss, correct, seen, scored = 0.0, 0, 0, 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for begin in range(0, n, cfg.batch_size):
                idx = order[begin : begin + cfg.batch_size]
                loss, hits, count = _step(model, opt, x[idx].to(self.device), y[idx].to(self.device), gen, prox,
                                          self.family)
                total_loss += loss * len(idx)
                correct += hits
                seen += len(idx)
                scored += count
                if after_step is not None:
                    try:
                        after_step(time.perf_counter() - start)
                    except BaseException:
                        _release(opt)
                        raise
        _release(opt)
        return self._result(model, n, total_loss, correct, seen, scored, start)

    def _result(self, model: torch.nn.Module, n: int, total_loss: float, correct: int, seen: int, scored: int,
                start: float) -> TrainResult:
        trained, kept = split_state(self.spec, get_state(model))
        return TrainResult(
            state=trained,
            num_samples=n,
            loss=total_loss / max(1, seen),
            accuracy=correct / max(1, scored),
            seconds=time.perf_counter() - start,
            private=dict(kept),
        )


    def evaluate(self, state: Mapping[str, np.ndarray], x: torch.Tensor, y: torch.Tensor,
                 private: Mapping[str, np.ndarray] | None = None, batch_size: int = 256) -> dict[str, float]:
        """The family's metrics (`family.metric_names`) of the received `state` plus
        this device's `private` tensors on (x, y): the `evaluate` task kind; nothing is trained."""
        set_state(self.model, {**state, **(private or {})})
        return evaluate(self.model, x.to(self.device), y.to(self.device), batch_size=batch_size, family=self.family)


def initial_private(spec: ModelSpec, in_shape: tuple[int, ...], num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A device's private tensors before its first round: those of the model built with `seed`
    (the same seeded initialisation as the hub's model, for the same seed)."""
    return dict(split_state(spec, get_state(build_model(spec, in_shape, num_classes, seed=seed)))[1])


Proximal = tuple[float, list[torch.nn.Parameter], list[torch.Tensor]]  # (mu, parameters, their anchors)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
          gen: torch.Generator, prox: Proximal | None = None, family: Family = CLASSIFICATION) -> tuple[float, int, int]:
    """One SGD/Adam step on the family's loss (`family.step`: the loss of the output, or for
    the contrastive family of two augmented views drawn from `gen`); returns (batch data loss,
    right predictions, scored predictions: examples, pixels or views). With `prox`, the
    FedProx term mu/2 sum ||p - anchor||^2 joins the loss that is minimised (not the one
    reported). Gradients are cleared before forward, so last step's are not held through it."""
    opt.zero_grad(set_to_none=True)
    loss, right, scored = family.step(model, xb, yb, gen)
    if prox is None:
        loss.backward()
    else:
        mu, params, anchors = prox
        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        (loss + 0.5 * mu * drift).backward()
    opt.step()
    return float(loss.detach()), right, scored


def _release(opt: torch.optim.Optimizer) -> None:
    """Drop gradients and optimiser state (momentum) once training is over, so they do not sit
    next to the state copy and the update envelope (a new optimiser is made every round)."""
    opt.zero_grad(set_to_none=True)
    opt.state.clear()


def uplink_state(trainer: LocalTrainer, result: TrainResult, codec: str | None,
                 received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a device sends after training, as the task's codec says (UPDATE_CARRIES, declared
    by the hub's strategy): its trained state; for a 'mask' codec (mask1, strategy mpt-mask)
    only the masks its trained scores select; for a 'sign' codec (sign1, strategy sign-delta)
    the change from `received` (the global the job started from), which the codec cuts to 1 bit.
    Only shared tensors: a model's private ones (registry.split_state) never leave the device."""
    carries = UPDATE_CARRIES.get(codec or "", "state")
    if carries == "mask":
        return {k: v for k, v in model_masks(trainer.model).items() if not is_private(trainer.spec, k)}
    if carries == "sign":
        return {k: v - np.asarray(received[k], dtype=np.float32) for k, v in result.state.items()
                if not is_private(trainer.spec, k)}
    return {k: v for k, v in result.state.items() if not is_private(trainer.spec, k)}
