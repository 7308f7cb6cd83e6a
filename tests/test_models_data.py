"""Models and data: exact parameter counts, state round trips, idx / torchvision loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.models.data import DataError, load_dataset, load_idx_dataset, read_idx
from fedge.models.registry import build_model, count_parameters, get_state, set_state

from .conftest import skip_or_fail


def test_conv4_has_exactly_1932352_parameters_on_28x28():
    model = build_model("conv4", (1, 28, 28), 10)
    assert count_parameters(model) == 1_932_352
    assert model.classifier[1].in_features == 6272
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_is_784_200_200_10():
    model = build_model("mlp")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


def test_state_round_trip_and_seeded_init():
    a = build_model("mlp", seed=5)
    b = build_model("mlp", seed=5)
    c = build_model("mlp", seed=6)
    sa, sb, sc = get_state(a), get_state(b), get_state(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["net.1.weight"], sc["net.1.weight"])
    set_state(c, sa)
    assert all(np.array_equal(get_state(c)[k], sa[k]) for k in sa)
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9")


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_mnist_files(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


def test_idx_loader_reads_generated_files(tmp_path):
    _fake_mnist_files(tmp_path)
    ds = load_idx_dataset(tmp_path)
    assert ds.train.x.shape == (60, 1, 28, 28) and ds.train.x.dtype == np.float32
    assert ds.test.y.tolist() == [i % 10 for i in range(20)]


def test_idx_loader_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "nowhere")
    _fake_mnist_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x10abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)


def test_torchvision_mnist_path_on_generated_files(tmp_path):
    _fake_mnist_files(tmp_path / "MNIST" / "raw", gz=False)
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.train.x.shape == (60, 1, 28, 28) and ds.num_classes == 10
    assert ds.train.y[:10].tolist() == list(range(10))


def test_torchvision_without_files_or_internet_gives_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not load cifar10 .*internet access"):
        load_dataset("cifar10", tmp_path, download=False)


def test_real_fashion_mnist_if_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        skip_or_fail("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and len(ds.test) == 10000
    assert np.bincount(ds.train.y).tolist() == [6000] * 10
