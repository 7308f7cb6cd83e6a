"""Input preprocessing constants, in a module of their own so that the torch-free predictor on a
device normalises exactly as training did without importing the data loaders."""

from __future__ import annotations

# dataset -> (mean, std) applied to pixel/255, one scalar for all channels (docs/protocol.md §6.1:
# a device written from the docs must preprocess exactly like this, the wire does not carry it)
NORMALISATION: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
    "cifar10": (0.4734, 0.2516),
}
