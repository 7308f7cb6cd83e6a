"""Paper 003's MPT-FL: the state of an MPT model is its pruning scores, so FedAvg of the
states is the sample-weighted average of the scores."""

from __future__ import annotations

from .fedavg import FedAvg


class MptScoreAvg(FedAvg):
    name = "mpt-score-avg"
