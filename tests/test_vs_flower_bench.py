"""benchmarks/vs_flower.py and its Flower side (benchmarks/flower_paper001.py): both sides must
train the same thing. The Flower side's local job gives fedge's trainer's weights bit for bit,
its data loading gives fedge's normalised images, and the experiment file carries fedge's own
split, initial weights and job seeds. Flower itself is never needed: its script imports flwr
only to run. The last test runs the benchmark's fedge side for one round."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.edge_agent.trainer import LocalTrainer, TrainConfig, job_seed
from fedge.hub.sim.recipes import get_recipe
from fedge.models.data import DEFAULT_FASHION_ROOT, load_dataset, load_idx_dataset, synthetic
from fedge.models.partition import partition
from fedge.models.registry import build_model, get_state

from .benchmark_module import load_benchmark
from .conftest import skip_or_fail


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("vs_flower.py")


@pytest.fixture(scope="module")
def flower_side():
    return load_benchmark("flower_paper001.py")


def _need_fashion_mnist() -> None:
    if not Path(DEFAULT_FASHION_ROOT).is_dir():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FASHION_ROOT} (apt-get install dataset-fashion-mnist)")


def test_flower_local_job_equals_fedge_trainer(flower_side):
    """Same received weights, data, settings and seed: the Flower client's weights are fedge's, bit for bit."""
    ds = synthetic(n_train=300, n_test=10, seed=3)
    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    start = get_state(build_model("mlp", ds.in_shape, 10, seed=5))
    settings = {"epochs": 2, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}
    seed = job_seed(0, 4, "dev003")
    ours = LocalTrainer("mlp", ds.in_shape, 10).train(start, x, y, TrainConfig(**settings), seed)
    theirs, loss = flower_side.train_local(flower_side.MLP(), {k: torch.from_numpy(v.copy()) for k, v in start.items()},
                                           x, y, settings, seed)
    assert list(theirs) == list(ours.state)
    for name, tensor in theirs.items():
        assert np.array_equal(tensor.numpy(), ours.state[name]), name
    assert loss == pytest.approx(ours.loss, rel=1e-6)
    assert not np.array_equal(ours.state["net.1.weight"], start["net.1.weight"])  # it did train


def _write_idx(path: Path, array: np.ndarray) -> None:
    head = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(head + array.astype(np.uint8).tobytes())


def test_flower_data_loading_equals_fedge(flower_side, tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, size=(20, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, size=20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, size=(7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=7))
    fedge = load_idx_dataset(tmp_path)
    for split, ref in (("train", fedge.train), ("t10k", fedge.test)):
        x, y = flower_side.load_split(tmp_path, split, 0.2860, 0.3530)
        assert x.dtype == ref.x.dtype and np.array_equal(x, ref.x) and np.array_equal(y, ref.y)


def test_experiment_file_holds_fedge_split_init_and_seeds(bench, flower_side, tmp_path):
    _need_fashion_mnist()
    path = tmp_path / "experiment.npz"
    counts = bench.write_experiment(path, rounds=3, data_root=None)
    exp = flower_side.Experiment.load(path)
    cfg = get_recipe("paper001")
    y = load_dataset("fashion-mnist").train.y
    parts = partition(y, cfg.devices, cfg.partition, seed=cfg.seed, num_classes=10)
    assert len(exp.parts) == 10 and all(np.array_equal(a, b) for a, b in zip(exp.parts, parts))
    assert [len(p) for p in exp.parts] == [6000] * 10 and sorted(counts) == [f"dev{i:03d}" for i in range(10)]
    assert exp.seeds.shape == (3, 10) and exp.seeds[2, 7] == job_seed(cfg.seed, 3, "dev007")
    initial = get_state(build_model("mlp", (1, 28, 28), 10, seed=cfg.hub.seed))
    assert list(exp.initial) == list(initial) and all(np.array_equal(exp.initial[k], v) for k, v in initial.items())
    assert exp.settings["train"] == {"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}


def test_bad_only_names_the_choices(bench):
    with pytest.raises(SystemExit, match="fedge-inproc"):
        bench.parse_only("fedge-inproc,flwr")


def test_one_round_fedge_side_and_missing_flower_venv(bench, tmp_path, capsys):
    """The fedge command runs, its run.json is read and its split checked; without the
    Flower venv that row is skipped with the command that creates it."""
    _need_fashion_mnist()
    out = tmp_path / "r.json"
    assert bench.main(["--rounds", "1", "--only", "fedge-inproc,flower", "--flower-python", str(tmp_path / "none"),
                       "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    fedge = result["runs"]["fedge-inproc"]
    assert fedge["final_accuracy"] > 0.5  # one FedAvg round of paper001 (chance: 0.1)
    assert fedge["rounds"] == 1 and fedge["transport"] == "inproc" and fedge["total_wall_seconds"] > fedge["seconds"][0]
    assert len(fedge["load_average_1min"]) == 2  # the machine's load beside the times
    assert "--recipe paper001 --no-central" in fedge["command"] and "--transport inproc" in fedge["command"]
    assert "flwr[simulation]" in result["runs"]["flower"]["skipped"] and "fedge_over_flower" not in fedge
    assert out.with_suffix(".png").stat().st_size > 0
    assert "python3 -m venv" in capsys.readouterr().out
