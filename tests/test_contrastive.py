"""The contrastive family (models/families.py, paper 002's self-supervised backbone): NT-Xent
against values worked out by hand, the linear probe on embeddings whose answer is known, the
augmentation's determinism, and mlp-contrastive learning through the real LocalTrainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
from fedge.models.errors import ConfigError
from fedge.models.families import CONTRASTIVE, augment, linear_probe_accuracy, nt_xent
from fedge.models.registry import build_model, get_state

from .family_data import shifted_patterns

E, X = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def test_nt_xent_by_hand_when_each_view_matches_its_pair() -> None:
    """Views a1 = b1 = e_x, a2 = b2 = e_y: every anchor's positive has cosine 1, its two
    negatives cosine 0, so each of the 4 anchors loses -log(e^(1/t) / (e^(1/t) + 2))."""
    z1, z2 = torch.cat([E, X]), torch.cat([E, X])
    loss, right = nt_xent(z1, z2, temperature=0.5)
    assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    assert right == 4
    scaled, _ = nt_xent(3 * z1, 0.1 * z2, temperature=0.5)  # cosine similarity: the scale does not matter
    assert float(scaled) == pytest.approx(float(loss), rel=1e-6)


def test_nt_xent_by_hand_when_the_views_are_swapped() -> None:
    """a1 = e_x, a2 = e_y, b1 = e_y, b2 = e_x: each anchor's positive has cosine 0 and one
    negative cosine 1: -log(e^0 / (e^0 + e^0 + e^(1/t))) = log(2 + e^2) at t = 0.5, and no
    anchor finds its positive."""
    loss, right = nt_xent(torch.cat([E, X]), torch.cat([X, E]), temperature=0.5)
    assert float(loss) == pytest.approx(math.log(2 + math.exp(2)), rel=1e-6)
    assert right == 0
    cooler, _ = nt_xent(torch.cat([E, X]), torch.cat([X, E]), temperature=0.25)
    assert float(cooler) == pytest.approx(math.log(2 + math.exp(4)), rel=1e-6)


def test_probe_on_separable_embeddings_is_perfect_and_on_noise_is_chance() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 6
    centres = 5 * torch.randn(6, 16, generator=gen)
    separable = centres[labels] + 0.3 * torch.randn(600, 16, generator=gen)
    assert linear_probe_accuracy(separable, labels) == 1.0
    noise = torch.randn(600, 16, generator=gen)  # features that say nothing about the labels
    assert abs(linear_probe_accuracy(noise, labels) - 1 / 6) < 0.08
    assert linear_probe_accuracy(separable, labels) == linear_probe_accuracy(separable.clone(), labels.clone())


def test_probe_refuses_what_it_cannot_score() -> None:
    with pytest.raises(ConfigError, match=r"one integer class label per example, got labels of shape \(4, 2\)"):
        linear_probe_accuracy(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="type torch.float32"):
        linear_probe_accuracy(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match="at least 2 labelled examples"):
        linear_probe_accuracy(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (4, 3, 32, 32)], ids=["greyscale", "rgb"])
def test_augment_is_reproducible_from_its_seed(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    first = augment(x, torch.Generator().manual_seed(7))
    assert first.shape == x.shape
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(x, torch.Generator().manual_seed(8)))


def test_augment_without_shift_jitter_or_noise_only_mirrors() -> None:
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    views = augment(x, torch.Generator().manual_seed(3), shift=0.0, jitter=0.0, noise=0.0)
    mirrored = [torch.equal(v, xi.flip(-1)) for v, xi in zip(views, x)]
    assert all(m or torch.equal(v, xi) for m, v, xi in zip(mirrored, views, x))
    assert 16 < sum(mirrored) < 48  # about half


def test_augment_shifts_by_at_most_its_share_of_the_image() -> None:
    """A lone bright pixel in the middle moves by at most round(0.15 * 28) = 4 pixels each way."""
    x = torch.zeros(200, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    views = augment(x, torch.Generator().manual_seed(4), flip=False, jitter=0.0, noise=0.0)
    where = (views[:, 0] == 1.0).flatten(1).float().argmax(1)
    rows, cols = where.div(28, rounding_mode="floor"), where % 28
    assert int((rows - 14).abs().max()) == 4 and int((cols - 14).abs().max()) == 4
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 40  # many different shifts, not one


def test_augment_refuses_a_batch_that_is_not_images() -> None:
    with pytest.raises(ConfigError, match=r"images \[N, C, H, W\], got a batch of shape \(3, 784\)"):
        augment(torch.zeros(3, 784), torch.Generator())


def test_mlp_contrastive_learns_an_embedding_a_linear_probe_reads() -> None:
    """Trained without labels on shifted class patterns, the encoder's embedding gives a linear
    probe far above chance (0.1) and clearly above the same probe on the untrained network;
    training is reproducible from its seed, bit for bit."""
    x, y = shifted_patterns(1500, seed=1)
    tx, ty = shifted_patterns(1000, seed=2)
    trainer = LocalTrainer("mlp-contrastive", (1, 28, 28), 10)
    assert trainer.family is CONTRASTIVE
    start = get_state(build_model("mlp-contrastive", seed=0))
    before = trainer.evaluate(start, tx, ty)
    cfg = TrainConfig(epochs=3, batch_size=128, lr=1e-3, optimizer="adam")
    result = trainer.train(start, x, y, cfg, seed=5)
    after = trainer.evaluate(result.state, tx, ty)
    assert set(after) == {"loss", "probe_accuracy"}
    assert after["probe_accuracy"] > max(0.8, before["probe_accuracy"] + 0.2), (before, after)  # measured: 0.61 -> 0.89
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert 0 < result.accuracy < 1  # the running share of views whose nearest other view is their pair
    again = LocalTrainer("mlp-contrastive", (1, 28, 28), 10).train(start, x, y, cfg, seed=5)
    for name, value in result.state.items():
        assert np.array_equal(again.state[name], value), name
    assert trainer.evaluate(result.state, tx, ty) == after  # evaluation is deterministic too
