"""Small generated data for the non-classification families, shared by their tests: bright
squares with their masks (segmentation) and shifted class patterns (contrastive), plus the
tiny segmentation net the tests register (never a registered model)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedge.models.data import Dataset, Split


class TinySeg(nn.Module):
    """Two 3x3 convolutions and a 1x1 to one logit per pixel: a test model, never registered."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bright_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x16x16 noise images, each with a bright square (side 3..6); the mask is the square."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, 16, 16, generator=gen)
    y = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        side = int(torch.randint(3, 7, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, 16 - side + 1, (2,), generator=gen))
        x[i, 0, r : r + side, c : c + side] += 0.7
        y[i, 0, r : r + side, c : c + side] = 1.0
    return x, y


def shifted_patterns(n: int, seed: int, classes: int = 10, max_shift: int = 4,
                     noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """1x28x28 images with class structure a contrastive model can find and a linear model of the
    raw pixels (or of an untrained network) finds only in part: each class is one fixed random
    pattern (blocks of 4x4 pixels, the same for every seed), shown rolled by up to `max_shift`
    pixels each way, mirrored with probability 1/2, plus Gaussian noise. Shift and mirror are
    what the contrastive family's augmentation varies, so two views of one image share only
    the class pattern."""
    protos = np.kron(np.random.default_rng(123).normal(size=(classes, 7, 7)), np.ones((4, 4))).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.empty((n, 1, 28, 28), np.float32)
    for i in range(n):
        pattern = protos[y[i]][:, ::-1] if rng.random() < 0.5 else protos[y[i]]
        shift = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, 2))
        x[i, 0] = np.roll(pattern, shift, axis=(0, 1)) + noise * rng.normal(size=(28, 28))
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def as_dataset(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               num_classes: int) -> Dataset:
    """Generated tensors as the fleet's Dataset (numpy arrays)."""
    return Dataset(name=name, train=Split(train[0].numpy(), train[1].numpy()),
                   test=Split(test[0].numpy(), test[1].numpy()), num_classes=num_classes)
