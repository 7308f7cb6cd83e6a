"""Round policies as pure functions of the run's settings: who is selected, what the task asks
for, when the run stops. The hub calls them over every transport (MQTT or the simulator's in-memory one)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .config import HubConfig

log = logging.getLogger("fedge.hub")


def round_train_settings(train: dict[str, Any], round_id: int, rounds: int) -> dict[str, Any]:
    """The task's training settings for this round; `lr_schedule: cosine` decays lr over rounds
    (the MPT code's cosine schedule, applied across federated rounds)."""
    out = dict(train)
    if out.pop("lr_schedule", None) == "cosine" and "lr" in out:
        out["lr"] = 0.5 * float(out["lr"]) * (1 + math.cos(math.pi * (round_id - 1) / max(1, rounds)))
    return out


def select_devices(online: list[str], k: int, seed: int, round_id: int, attempt: int = 0) -> list[str]:
    """Seeded choice of k devices (0 = all): the same fleet state always gives the same round."""
    pool = sorted(online)
    k = min(k or len(pool), len(pool))
    rng = np.random.default_rng([seed, round_id, attempt])
    return sorted(rng.choice(pool, size=k, replace=False).tolist())


def should_stop(cfg: HubConfig, record: dict[str, Any], round_id: int) -> bool:
    """Whether the run ends after this round: the round budget, the target accuracy or a global
    model that no longer moves (paper 004's rule), each logged when it fires."""
    if round_id >= cfg.rounds:
        return True
    accuracy = record.get("accuracy")
    if cfg.target_accuracy is not None and accuracy is not None and accuracy >= cfg.target_accuracy:
        log.info("target accuracy %.4f reached at round %d", cfg.target_accuracy, round_id)
        return True
    change = record.get("weight_change")
    if cfg.min_weight_change is not None and change is not None and change < cfg.min_weight_change:
        log.info("weight change %.5f below %.5f at round %d", change, cfg.min_weight_change, round_id)
        return True
    return False
