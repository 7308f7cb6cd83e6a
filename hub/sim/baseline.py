"""A plain in-process FedAvg loop (no MQTT, no hub): the yardstick the fleet is measured against.

It shares selection, training, seeds, aggregation and evaluation with the real path, so
with the fp32 codec both produce the same global model bit for bit; only transport differs.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from fedge.edge_agent.profile import load_profile
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig, job_seed, uplink_state
from fedge.hub.config import HubConfig
from fedge.hub.rounds import round_train_settings, select_devices
from fedge.hub.strategies import UPDATE_CODEC, check_strategy_fits, get_strategy
from fedge.models.data import Dataset
from fedge.models.evaluate import evaluate
from fedge.models.registry import build_model, get_state, set_state
from fedge.models.wire.codecs import decode_tensors, encode_tensors


def plain_fedavg(dataset: Dataset, parts: list[np.ndarray], hub: HubConfig, profile_name: str = "sim",
                 rounds: int | None = None, history: list[dict] | None = None) -> list[dict]:
    """Run FedAvg rounds in this thread; one record per round with accuracy and seconds,
    appended to `history` as each round ends (a caller that is stopped keeps what was done)."""
    profile = replace(load_profile(profile_name), model=hub.model)
    trainer = LocalTrainer(hub.model, dataset.in_shape, dataset.num_classes, device=profile.device)
    state = get_state(build_model(hub.model, dataset.in_shape, dataset.num_classes, seed=hub.seed))
    check_strategy_fits(hub.strategy, hub.model, state)
    devices = {f"dev{i:03d}": (torch.from_numpy(dataset.train.x[idx]), torch.from_numpy(dataset.train.y[idx]))
               for i, idx in enumerate(parts)}
    n_eval = hub.eval_size or len(dataset.test)
    tx = torch.from_numpy(dataset.test.x[:n_eval]).to(trainer.device)
    ty = torch.from_numpy(dataset.test.y[:n_eval]).to(trainer.device)
    aggregate = get_strategy(hub.strategy)
    history = [] if history is None else history
    for round_id in range(1, (rounds or hub.rounds) + 1):
        start = time.time()
        selected = select_devices(list(devices), hub.clients_per_round, hub.seed, round_id)
        cfg = TrainConfig.resolve(profile, round_train_settings(hub.train, round_id, hub.rounds))
        codec = hub.update_codec or UPDATE_CODEC.get(hub.strategy)
        received = state if hub.model_codec == "fp32" else decode_tensors(*encode_tensors(state, hub.model_codec))
        updates = []
        for dev in selected:  # devices start from the model as the downlink codec delivers it
            x, y = devices[dev]
            res = trainer.train(received, x, y, cfg, job_seed(hub.seed, round_id, dev))
            updates.append((uplink_state(trainer, res, codec, received), res.num_samples))
        state = aggregate(state, updates)
        set_state(trainer.model, state)
        loss, acc = evaluate(trainer.model, tx, ty)
        history.append({"round": round_id, "accuracy": acc, "loss": loss, "seconds": time.time() - start,
                        "participants": selected})
    return history
