"""Round policies as pure functions of the run's settings: who is selected, what the task asks
for, when the run stops. The hub calls them over every transport (MQTT or the simulator's in-memory one)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedge.models.errors import FedgeError
from fedge.models.registry import model_family

from .config import HubConfig
from .plan import Stage

log = logging.getLogger("fedge.hub")


class RoundsFailed(FedgeError, RuntimeError):
    """A round got too few answers in every attempt; the message names the devices that said why."""


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


def stage_done(cfg: HubConfig, stage: Stage, record: dict[str, Any], rounds_done: int) -> bool:
    """Whether `stage` ends after this round (its `rounds_done`-th): its round budget, or for a
    train stage the target score (`target_score`: the model family's headline metric, e.g.
    accuracy or F1, of the global model) or a global model that no longer moves (paper 004's
    rule), each logged when it fires. The run ends when its last stage does."""
    if rounds_done >= stage.rounds:
        return True
    if stage.kind != "train":
        return False
    round_id = record["round"]
    headline = model_family(cfg.model).headline
    score = (record.get("metrics") or {}).get(headline, record.get(headline))  # a record from before families: its column
    if cfg.target_score is not None and score is not None and score >= cfg.target_score:
        log.info("target %s %.4f reached at round %d", headline, cfg.target_score, round_id)
        return True
    change = record.get("weight_change")
    if cfg.min_weight_change is not None and change is not None and change < cfg.min_weight_change:
        log.info("weight change %.5f below %.5f at round %d", change, cfg.min_weight_change, round_id)
        return True
    return False


def plan_position(cfg: HubConfig, stages: list[Stage], history: list[dict[str, Any]]) -> tuple[int, int]:
    """(index of the stage the next round belongs to, rounds of it already completed), from the
    completed rounds, each of which records its stage (rounds from before plans: stage 0). An
    index of len(stages) means the plan is done."""
    if not history:
        return 0, 0
    last = history[-1]
    stage = int(last.get("stage") or 0)
    if stage >= len(stages):
        return len(stages), 0
    done = sum(1 for r in history if int(r.get("stage") or 0) == stage)
    if stage_done(cfg, stages[stage], last, done):
        return stage + 1, 0
    return stage, done
