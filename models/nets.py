"""Network definitions: the MLP of paper 001 (its split encoder/head form, and a contrastive form
for paper 002's self-supervised backbone) and the Conv-4 of paper 003 (MPT)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """784-200-200-10 fully connected classifier (paper 001's 'basic MLP')."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, hidden: int = 200) -> None:
        super().__init__()
        n_in = 1
        for d in in_shape:
            n_in *= int(d)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SplitMLP(nn.Module):
    """The MLP cut in two: a shared `encoder` (784-200-200) and a `head` (200-classes) that the
    registry declares private (mlp-private-head), so each device keeps its own classifier."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, hidden: int = 200) -> None:
        super().__init__()
        n_in = 1
        for d in in_shape:
            n_in *= int(d)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ContrastiveMLP(nn.Module):
    """SplitMLP's encoder (784-200-200, the same tensor names `encoder.*`) under a SimCLR
    projection head (200-200-`proj`): trained without labels by the contrastive family, whose
    probe reads `embed` (the encoder's output), not the projection. Paper 002's backbone: its
    `encoder.*` tensors load into an `mlp-private-head` model for the per-device heads.
    `num_classes` is not used; the projection's size is `proj`."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, hidden: int = 200,
                 proj: int = 64) -> None:
        super().__init__()
        n_in = 1
        for d in in_shape:
            n_in *= int(d)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, proj))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


class Conv4(nn.Module):
    """Conv-4 of the MPT paper: conv 64,64, pool, conv 128,128, pool, fc 256,256,classes.

    3x3 convolutions with padding 1 and no biases anywhere, as in the MPT/edge-popup code,
    so the parameter count on 1x28x28 is exactly 1,932,352.
    """

    def __init__(self, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = (int(d) for d in in_shape)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 128 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 256, bias=False),
            nn.ReLU(),
            nn.Linear(256, 256, bias=False),
            nn.ReLU(),
            nn.Linear(256, num_classes, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
