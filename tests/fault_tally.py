"""Counts what the fault-injection tests did, for the summary line at the end of pytest."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class FaultTally:
    faults: int = 0
    rounds: int = 0
    lost: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, faults: int, rounds: int, lost: int) -> None:
        with self._lock:
            self.faults += faults
            self.rounds += rounds
            self.lost += lost


TALLY = FaultTally()
