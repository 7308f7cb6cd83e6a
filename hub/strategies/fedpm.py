"""FedPM (Isik et al., ICLR 2023): each update is ONE mask a device drew from its trained
keep-probabilities theta = sigmoid(scores) (codec mask1; models/supermask/fedpm.py).

Per weight the hub keeps a Beta(alpha, beta) posterior over the keep-probability: a device's
mask bit is one Bernoulli observation, so alpha += m, beta += 1 - m. The posterior mean
alpha / (alpha + beta) is the next theta, sent down as scores = logit(theta) clipped to
[logit(prob_clip), logit(1 - prob_clip)] (a device cannot move a probability of exactly 0 or 1).
With `posterior` "reset" (FedPM's default) the posterior starts each round from the prior
Beta(prior, prior); with "accumulate", the counts carry across rounds (server state, checkpointed), each
round's old counts multiplied by `posterior_decay` (1: plain accumulation; below 1 an
exponential forgetting that lets theta keep moving while smoothing the 10-mask estimate)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec
from fedge.models.wire.codecs import MASK_CODEC, MASK_RC_CODEC, MASK_ZSTD_CODEC

from .base import Strategy
from .mpt_mask import MptMask
from .utils import State, Update, require_updates


def theta_of(scores: np.ndarray) -> np.ndarray:
    """Keep-probabilities sigmoid(scores) (what the device's sampled masks are drawn from)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))


def scores_of(theta: np.ndarray, eps: float) -> np.ndarray:
    """logit(theta), theta clipped to [eps, 1 - eps], as float32 scores."""
    t = np.clip(np.asarray(theta, dtype=np.float64), eps, 1.0 - eps)
    return np.log(t / (1.0 - t)).astype(np.float32)


MASK_CODECS = (MASK_CODEC, MASK_RC_CODEC, MASK_ZSTD_CODEC)  # what a FedPM update may be sent in
POSTERIORS = ("reset", "accumulate")  # a fresh Beta(prior, prior) every round, or counts kept across rounds


class FedPM(Strategy):
    name = "fedpm"
    sends = "mask"
    codec = "mask1"

    def __init__(self, prior: float = 1.0, posterior: str = "reset", prob_clip: float = 0.01,
                 posterior_decay: float = 1.0) -> None:
        for key, value in (("prior", prior), ("prob_clip", prob_clip)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"fedpm: {key} must be a positive number, got {value!r}")
        if not prob_clip < 0.5:
            raise ConfigError(f"fedpm: prob_clip must be below 0.5, got {prob_clip!r}")
        if posterior not in POSTERIORS:
            raise ConfigError(f"fedpm: posterior must be one of {', '.join(POSTERIORS)}, got {posterior!r}")
        if isinstance(posterior_decay, bool) or not isinstance(posterior_decay, (int, float)) \
                or not 0 < posterior_decay <= 1:
            raise ConfigError(f"fedpm: posterior_decay must be in (0, 1], got {posterior_decay!r}")
        self.prior, self.accumulate, self.eps = float(prior), posterior == "accumulate", float(prob_clip)
        self.decay = float(posterior_decay)
        self.stateful = self.accumulate  # type: ignore[misc]  # only the accumulated posterior is server state
        self.alpha: dict[str, np.ndarray] = {}
        self.beta: dict[str, np.ndarray] = {}

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> OrderedDict[str, np.ndarray]:
        require_updates("fedpm", updates)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, prev in global_state.items():
            shape = np.shape(prev)
            ones = np.zeros(shape, dtype=np.float64)
            for tensors, _ in updates:
                bits = np.asarray(tensors[name], dtype=np.float64)
                if bits.shape != shape or not np.all((bits == 0) | (bits == 1)):
                    raise ConfigError(f"fedpm: update tensor {name!r} is not a 0/1 mask of shape {shape}")
                ones += bits
            if self.accumulate and name in self.alpha:
                # older rounds' counts fade by `decay` (the prior stays): theta follows the fleet
                a0, b0 = self.alpha[name] - self.prior, self.beta[name] - self.prior
                alpha = self.prior + self.decay * a0 + ones
                beta = self.prior + self.decay * b0 + (len(updates) - ones)
            else:
                alpha, beta = self.prior + ones, self.prior + (len(updates) - ones)
            if self.accumulate:
                self.alpha[name], self.beta[name] = alpha, beta
            out[name] = scores_of(alpha / (alpha + beta), self.eps)
        return out

    def task_codec(self, requested: str | None) -> str | None:
        """mask1 by default; --update-codec may pick an entropy-coded mask instead (maskrc:
        range-coded with theta as the model, mask1z: zstd of the mask1 bits)."""
        if requested is None:
            return self.codec
        if requested not in MASK_CODECS:
            raise ConfigError(f"strategy fedpm sends masks: update codec must be one of {', '.join(MASK_CODECS)}, "
                              f"not {requested!r}")
        return requested

    def check_fits(self, model: ModelSpec, state: State) -> None:
        """Only supermask scores (as mpt-mask), and the model should draw its masks (mlp-fedpm, conv4-fedpm)."""
        MptMask.check_fits(self, model, state)  # type: ignore[arg-type]
        if "fedpm" not in model.name:
            raise ConfigError(f"strategy fedpm needs a model that trains sampled masks (mlp-fedpm, conv4-fedpm), "
                              f"not {model.name}")

    def server_state(self) -> dict[str, np.ndarray]:
        if not self.accumulate:
            return {}
        return {**{f"alpha/{k}": v for k, v in self.alpha.items()}, **{f"beta/{k}": v for k, v in self.beta.items()}}

    def load_server_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        alpha: dict[str, np.ndarray] = {}
        beta: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            slot, _, tensor = key.partition("/")
            if slot not in ("alpha", "beta") or not tensor or not self.accumulate:
                raise ConfigError(f"strategy fedpm (accumulate={self.accumulate}): unexpected server state {key!r}")
            (alpha if slot == "alpha" else beta)[tensor] = np.array(value, dtype=np.float64)
        if sorted(alpha) != sorted(beta):
            raise ConfigError("strategy fedpm: server state has alpha and beta for different tensors")
        self.alpha, self.beta = alpha, beta
