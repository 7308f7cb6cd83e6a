"""Run epochs: one strictly increasing, signed number per run, by which devices order runs and
refuse replays of earlier ones (models/wire/freshness.py, protocol.md "Run binding and replay")."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedge.models.errors import ConfigError

EPOCH_FILE = "run_epoch"  # in the keys folder: the last epoch handed out by any run signed with this key


def new_run_epoch(keys_dir: str | None) -> int:
    """A run epoch larger than every earlier one: the clock in ns, and (with a keys folder) at
    least one more than the last epoch recorded there, so a clock set back cannot reuse one."""
    epoch = time.time_ns()
    if not keys_dir:
        return epoch
    path = Path(keys_dir) / EPOCH_FILE
    try:
        last = int(path.read_text().strip()) if path.exists() else 0
    except ValueError:
        raise ConfigError(f"{path} must hold one integer (the last run epoch); fix or restore it") from None
    epoch = max(epoch, last + 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{epoch}\n")
    os.replace(tmp, path)
    return epoch
