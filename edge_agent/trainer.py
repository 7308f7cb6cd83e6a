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
from fedge.models.supermask.fedpm import seed_sampling, uplink_masks
from fedge.models.wire.codecs import UPDATE_CARRIES
from fedge.models.wire.sign_quant import quantise_change

from .fused_mlp import fused_reason, train_fused
from .optimiser import LocalOptimiser
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
    # sign uplinks only (models/wire/sign_quant.py): how the change becomes +-scale, and whether
    # the device keeps what quantisation dropped and adds it to its next change (error feedback)
    sign_quantiser: str = "deterministic"
    error_feedback: bool = False

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
            sign_quantiser=str(task.get("sign_quantiser", "deterministic")),
            error_feedback=bool(task.get("error_feedback", False)),
        )


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    num_samples: int
    loss: float
    accuracy: float  # the family's running score: right / scored predictions (examples, pixels or contrastive views)
    seconds: float
    private: dict[str, np.ndarray] = field(default_factory=dict)  # trained private tensors: they stay here
    residual: dict[str, np.ndarray] = field(default_factory=dict)  # error feedback: what the uplink dropped


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
        # foreach update rules of torch.optim's SGD/Adam without torch.optim itself, which imports
        # torch._dynamo (~150 MB resident) when an optimiser is built (edge_agent/optimiser.py)
        opt = LocalOptimiser(params, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # FedProx's anchor: the weights as received; no term (and no copy) when mu is 0
        prox = (cfg.proximal_mu, params, [p.detach().clone() for p in params]) if cfg.proximal_mu > 0 else None
        gen = torch.Generator().manual_seed(seed)
        seed_sampling(model, seed)  # FedPM layers' mask draws (a no-op without supermask layers)
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


def _step(model: torch.nn.Module, opt: LocalOptimiser, xb: torch.Tensor, yb: torch.Tensor,
          gen: torch.Generator, prox: Proximal | None = None, family: Family = CLASSIFICATION) -> tuple[float, int, int]:
    """One SGD/Adam step on the family's loss (`family.step`: the loss of the output, or for
    the contrastive family of two augmented views drawn from `gen`); returns (batch data loss,
    right predictions, scored predictions: examples, pixels or views). With `prox`, the
    FedProx term mu/2 sum ||p - anchor||^2 joins the loss that is minimised (not the one
    reported). Gradients are cleared before forward, so last step's are not held through it."""
    opt.zero_grad()
    loss, right, scored = family.step(model, xb, yb, gen)
    if prox is None:
        loss.backward()
    else:
        mu, params, anchors = prox
        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        (loss + 0.5 * mu * drift).backward()
    opt.step()
    return float(loss.detach()), right, scored


def _release(opt: LocalOptimiser) -> None:
    """Drop gradients and optimiser state (momentum) once training is over, so they do not sit
    next to the state copy and the update envelope (a new optimiser is made every round)."""
    opt.release()


def uplink_state(trainer: LocalTrainer, result: TrainResult, codec: str | None,
                 received: Mapping[str, np.ndarray], cfg: TrainConfig | None = None, seed: int = 0,
                 residual: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What a device sends after training, as the task's codec says (UPDATE_CARRIES, declared
    by the hub's strategy): its trained state; for a 'mask' codec (mask1, strategy mpt-mask)
    only the masks its trained scores select (FedPM layers: one mask drawn from sigmoid(scores),
    supermask/fedpm.py); for a 'sign' codec (sign1, strategy sign-delta)
    the change from `received` (the global the job started from), which the codec cuts to 1 bit,
    quantised as `cfg` says (sign_quant.quantise_change, seeded by the job's `seed`; with error
    feedback `residual` is added first and the new residual is left in `result.residual`).
    Only shared tensors: a model's private ones (registry.split_state) never leave the device."""
    carries = UPDATE_CARRIES.get(codec or "", "state")
    if carries == "mask":
        return {k: v for k, v in uplink_masks(trainer.model).items() if not is_private(trainer.spec, k)}
    if carries == "sign":
        change = {k: v - np.asarray(received[k], dtype=np.float32) for k, v in result.state.items()
                  if not is_private(trainer.spec, k)}
        cfg = cfg or TrainConfig()
        if cfg.sign_quantiser == "deterministic" and not cfg.error_feedback:
            return change
        sent, left = quantise_change(change, cfg.sign_quantiser, seed, residual if cfg.error_feedback else None)
        result.residual = left if cfg.error_feedback else {}
        return sent
    return {k: v for k, v in result.state.items() if not is_private(trainer.spec, k)}
