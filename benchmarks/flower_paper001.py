"""Paper 001 on Flower's simulation (Ray actors): the Flower side of benchmarks/vs_flower.py.

It runs in its own virtualenv (flwr[simulation] pins an older typer than fedge's amqtt needs),
so it never imports fedge. Everything both sides must share comes from the experiment file
that vs_flower.py writes with fedge's own functions: each device's image indices (fedge's
`dominant` partition with the recipe's seed), the initial weights (fedge's seeded MLP), the
shuffling seed of every (round, device) job, the local training settings and the
normalisation constants. The training loop, evaluation and idx reading below are written to
do what fedge's do (tests/test_vs_flower_bench.py checks that one local job gives the same
weights as fedge's trainer), with torch and numpy only; `flwr` is imported only to run.

    /work/flower-venv/bin/python benchmarks/flower_paper001.py --experiment runs/vs_flower/experiment.npz \\
        --out runs/vs_flower/flower.json

Round time: from the strategy's configure_train of round r (model sent to the sampled nodes)
to the end of the centralised evaluation of the aggregated model on all test images, the
same span as a fedge round (round opened -> aggregated -> evaluated -> recorded).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENV_EXPERIMENT = "FEDGE_FLOWER_EXPERIMENT"  # how the Ray actors find the experiment (they inherit the environment)
ENV_DATA_ROOT = "FEDGE_FLOWER_DATA_ROOT"
ENV_THREADS = "FEDGE_FLOWER_THREADS"


# ----------------------------------------------------------------------------- data and model
def read_idx(path: Path) -> np.ndarray:
    """An idx1/idx3 unsigned-byte file (optionally .gz) as a uint8 array."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
        head = fh.read(4)
        if len(head) != 4 or head[:3] != b"\x00\x00\x08":
            raise SystemExit(f"{path}: not an unsigned-byte idx file")
        dims = struct.unpack(">" + "I" * head[3], fh.read(4 * head[3]))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"missing {stem}(.gz) in {root}: give --data-root the Fashion-MNIST idx folder")


def load_split(root: str | Path, split: str, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `train` or `t10k` as float32 [N, 1, 28, 28], (pixel / 255 - mean) / std, and int64 labels."""
    root = Path(root)
    images = read_idx(_idx_file(root, f"{split}-images-idx3-ubyte"))[:, None]
    labels = read_idx(_idx_file(root, f"{split}-labels-idx1-ubyte")).astype(np.int64)
    x = images.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32), labels


class MLP(nn.Module):
    """784-200-200-10 with the same layer names as fedge's (`net.1`, `net.3`, `net.5`)."""

    def __init__(self, n_in: int = 784, hidden: int = 200, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_local(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                settings: dict[str, Any], seed: int) -> tuple[OrderedDict[str, torch.Tensor], float]:
    """One device's local job: SGD from the received weights, a fresh optimiser, batches in the
    order of a permutation drawn from a generator seeded with the job's seed, gradients cleared
    before each forward. Returns the trained weights and the mean training loss."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=float(settings["lr"]), momentum=float(settings.get("momentum", 0.0)),
                          weight_decay=float(settings.get("weight_decay", 0.0)))
    gen = torch.Generator().manual_seed(int(seed))
    n, batch = len(y), int(settings["batch_size"])
    total, seen = 0.0, 0
    for _ in range(int(settings.get("epochs", 1))):
        order = torch.randperm(n, generator=gen)
        for begin in range(0, n, batch):
            idx = order[begin : begin + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    opt.zero_grad(set_to_none=True)
    trained = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    return trained, total / max(1, seen)


@torch.no_grad()
def evaluate(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `state` on the whole set, in eval mode."""
    model.load_state_dict(state)
    model.eval()
    right, loss = 0, 0.0
    for begin in range(0, len(y), batch):
        logits = model(x[begin : begin + batch])
        right += int((logits.argmax(1) == y[begin : begin + batch]).sum())
        loss += float(F.cross_entropy(logits, y[begin : begin + batch], reduction="sum"))
    return right / len(y), loss / len(y)


@dataclass
class Experiment:
    """The experiment file's content (written by vs_flower.write_experiment)."""

    settings: dict[str, Any]  # train, normalisation, devices, rounds, device_ids, hidden
    parts: list[np.ndarray]  # per device: indices into the training set
    initial: OrderedDict[str, np.ndarray]  # the global model before round 1
    seeds: np.ndarray  # [rounds, devices]: each local job's seed

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        with np.load(path) as f:
            settings = json.loads(str(f["settings"]))
            sizes = f["sizes"]
            parts = np.split(f["indices"], np.cumsum(sizes)[:-1])
            initial = OrderedDict((k[len("init:"):], f[k]) for k in settings["tensor_order"])
            return cls(settings, parts, initial, f["seeds"])


def initial_state(exp: Experiment) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in exp.initial.items())


# ----------------------------------------------------------------------------- the Flower apps
_ACTOR: dict[str, Any] = {}  # per Ray actor process: experiment, training set and model, loaded once


def _actor_state() -> dict[str, Any]:
    if not _ACTOR:
        exp = Experiment.load(os.environ[ENV_EXPERIMENT])
        norm = exp.settings["normalisation"]
        x, y = load_split(os.environ[ENV_DATA_ROOT], "train", norm["mean"], norm["std"])
        _ACTOR.update(exp=exp, x=torch.from_numpy(x), y=torch.from_numpy(y),
                      model=MLP(hidden=int(exp.settings["hidden"])))
    torch.set_num_threads(int(os.environ.get(ENV_THREADS, "1")))
    return _ACTOR


def client_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train function: this node's partition, trained from the received model."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    actor = _actor_state()
    exp: Experiment = actor["exp"]
    device = int(context.node_config["partition-id"])
    config = msg.content["config"]
    server_round = int(config["server-round"])
    settings = {k: config[k] for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay")}
    idx = torch.from_numpy(exp.parts[device])
    state, loss = train_local(actor["model"], msg.content["arrays"].to_torch_state_dict(), actor["x"][idx],
                              actor["y"][idx], settings, int(exp.seeds[server_round - 1, device]))
    reply = RecordDict({"arrays": ArrayRecord(state),
                        "metrics": MetricRecord({"num-examples": len(idx), "train_loss": loss})})
    return Message(content=reply, reply_to=msg)


def run(exp_path: str, data_root: str, rounds: int, actors: int, threads: int) -> dict[str, Any]:
    """Flower's simulation of the experiment: 10 SuperNodes, FedAvg over all every round,
    centralised evaluation on the test set after every round. Returns the per-round record."""
    import flwr
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    exp = Experiment.load(exp_path)
    if rounds > len(exp.seeds):
        raise SystemExit(f"the experiment file has seeds for {len(exp.seeds)} rounds, not {rounds}")
    devices = int(exp.settings["devices"])
    norm = exp.settings["normalisation"]
    os.environ.update({ENV_EXPERIMENT: str(Path(exp_path).resolve()), ENV_DATA_ROOT: str(data_root),
                       ENV_THREADS: str(threads)})
    record: dict[str, Any] = {"rounds": []}
    starts: dict[int, float] = {}

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round's training is configured (the round's start)."""

        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN202
            starts[server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

    def server_main(grid, context) -> None:  # noqa: ANN001
        test_x, test_y = load_split(data_root, "t10k", norm["mean"], norm["std"])
        tx, ty = torch.from_numpy(test_x), torch.from_numpy(test_y)
        model = MLP(hidden=int(exp.settings["hidden"]))

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            acc, loss = evaluate(model, arrays.to_torch_state_dict(), tx, ty)
            if server_round == 0:
                record["initial_accuracy"] = acc
            else:
                record["rounds"].append({"round": server_round, "seconds": time.perf_counter() - starts[server_round],
                                         "accuracy": acc, "loss": loss})
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=devices,
                               min_available_nodes=devices)
        train = {k: exp.settings["train"][k] for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay")}
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state(exp)), num_rounds=rounds,
                       train_config=ConfigRecord(train), evaluate_fn=evaluate_fn)

    server_app = ServerApp()
    server_app.main()(server_main)
    client_app = ClientApp()
    client_app.train()(client_train)
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": actors, "logging_level": "ERROR"}})
    record.update(simulation_s=time.perf_counter() - started, flwr=flwr.__version__, ray=ray.__version__,
                  torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
                  actors=actors, threads_per_actor=threads, server_torch_threads=torch.get_num_threads())
    if len(record["rounds"]) != rounds:
        raise SystemExit(f"Flower's simulation ended after {len(record['rounds'])} of {rounds} rounds (its log says why)")
    record["final_accuracy"] = record["rounds"][-1]["accuracy"]
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True, help="the .npz that benchmarks/vs_flower.py wrote")
    ap.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--rounds", type=int, help="default: every round the experiment file has seeds for")
    ap.add_argument("--actors", type=int, default=2, help="Ray actors (CPUs given to Ray, 1 per client)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    ap.add_argument("--out", required=True, help="JSON with the per-round times and accuracies")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rounds = args.rounds or len(Experiment.load(args.experiment).seeds)
    record = run(args.experiment, args.data_root, rounds, args.actors, args.threads)
    record["script_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"flower: {rounds} rounds, final accuracy {record['final_accuracy']:.4f}, wrote {args.out}")
    return 0


if __name__ == "__main__":
    # run as the module `flower_paper001` (this folder is on sys.path), so Ray pickles its
    # functions by reference and each actor imports it once and keeps its data in _ACTOR
    import flower_paper001

    sys.exit(flower_paper001.main())
