"""The run store: one SQLite file and one checkpoint folder per run, so a crash loses nothing.

Order of writes when a round completes: the strategy's server state (if it keeps any, e.g.
FedAvgM's momentum) and the checkpoint file (atomic renames) first, then one
transaction that records the round and clears its pending updates. A crash between the
two re-runs the round from the same persisted updates; it is never counted twice.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, accuracy REAL, loss REAL,
    participants TEXT NOT NULL, selected TEXT NOT NULL, bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL,
    seconds REAL NOT NULL, weight_change REAL, train_loss REAL, completed_at REAL NOT NULL,
    kind TEXT, stage INTEGER, device_accuracy REAL, device_loss REAL, device_metrics TEXT, metrics TEXT);
CREATE TABLE IF NOT EXISTS open_round (round INTEGER PRIMARY KEY, task TEXT NOT NULL, started_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    round INTEGER NOT NULL, device TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS rejections (ts REAL NOT NULL, device TEXT, round INTEGER, reason TEXT NOT NULL);
"""
ROUND_COLUMNS_ADDED = (("kind", "TEXT"), ("stage", "INTEGER"), ("device_accuracy", "REAL"), ("device_loss", "REAL"),
                      ("device_metrics", "TEXT"), ("metrics", "TEXT"),  # run plans, reports, families (issue 11)
                      ("bytes_up_body", "INTEGER"))  # the updates' bodies alone (issue 14: bits per weight)
ROUND_COLUMNS = ("round", "model_version", "accuracy", "loss", "participants", "selected", "bytes_up", "bytes_down",
                 "seconds", "weight_change", "train_loss", "completed_at") + tuple(c for c, _ in ROUND_COLUMNS_ADDED)


class RunStore:
    """Thread-safe (one lock) access to a run's SQLite file and checkpoints."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "run.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A run store from before run plans lacks the newer round columns: add them (empty), so
        such a run resumes; its rounds read as stage 0, kind train."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}
        for name, sql_type in ROUND_COLUMNS_ADDED:
            if name not in have:
                try:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {name} {sql_type}")
                except sqlite3.OperationalError as exc:  # another process (a monitor, a resumed hub) added it first
                    if "duplicate column" not in str(exc):
                        raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint_path(self, version: int) -> Path:
        return self.dir / "checkpoints" / f"model_v{version:05d}.fedge"

    def server_state_path(self, version: int) -> Path:
        return self.dir / "checkpoints" / f"server_v{version:05d}.npz"

    def save_checkpoint(self, version: int, payload: bytes, keep: int = 2,
                        server_state: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write model version `version` (and the strategy's server state after it, if any:
        first, so a checkpoint never exists without the state it was aggregated with)."""
        if server_state:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v) for k, v in server_state.items()})
            _write_atomic(self.server_state_path(version), buf.getvalue())
        path = self.checkpoint_path(version)
        _write_atomic(path, payload)
        if keep > 0:
            for pattern in ("model_v*.fedge", "server_v*.npz"):
                for old in sorted(self.dir.glob(f"checkpoints/{pattern}"))[:-keep]:
                    if old != self.checkpoint_path(0):
                        old.unlink(missing_ok=True)
        return path

    def load_server_state(self, version: int) -> dict[str, np.ndarray] | None:
        """The strategy's server state saved with checkpoint `version`; None if none was."""
        path = self.server_state_path(version)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def load_checkpoint(self, version: int) -> bytes:
        path = self.checkpoint_path(version)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint for model version {version} missing: {path}")
        return path.read_bytes()

    # -- rounds ----------------------------------------------------------------------
    def open_round(self, round_id: int, task: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO open_round VALUES (?, ?, ?)", (round_id, json.dumps(task), time.time()))

    def get_open_round(self) -> tuple[int, dict] | None:
        with self._lock:
            row = self._db.execute("SELECT round, task FROM open_round ORDER BY round DESC LIMIT 1").fetchone()
        return (int(row[0]), json.loads(row[1])) if row else None

    def discard_open_round(self, round_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM open_round WHERE round = ?", (round_id,))
            self._db.execute("DELETE FROM pending WHERE round = ?", (round_id,))

    def add_pending(self, round_id: int, device: str, payload: bytes) -> bool:
        """Persist an accepted update; False if this device already has one for the round."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?)", (round_id, device, payload, time.time())
            )
            return cur.rowcount == 1

    def pending(self, round_id: int) -> dict[str, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT device, payload FROM pending WHERE round = ?", (round_id,)).fetchall()
        return {d: bytes(p) for d, p in rows}

    def complete_round(self, record: dict) -> None:
        """Record a finished round and drop its pending updates, atomically."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = {**record, "participants": json.dumps(record["participants"]),
                       "selected": json.dumps(record["selected"]), "completed_at": time.time(),
                       "kind": record.get("kind", "train"), "stage": int(record.get("stage") or 0),
                       "device_metrics": json.dumps(record["device_metrics"]) if "device_metrics" in record else None,
                       "metrics": json.dumps(record["metrics"]) if record.get("metrics") is not None else None}
                db.execute(f"INSERT INTO rounds ({', '.join(ROUND_COLUMNS)}) VALUES ({', '.join('?' * len(ROUND_COLUMNS))})",
                           tuple(row.get(c) for c in ROUND_COLUMNS))
                db.execute("DELETE FROM pending WHERE round = ?", (record["round"],))
                db.execute("DELETE FROM open_round WHERE round = ?", (record["round"],))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def rounds(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM rounds ORDER BY round")
            cols = [c[0] for c in cur.description]
            rows = cur.fetchall()
        out = []
        for row in rows:
            rec = dict(zip(cols, row))
            rec["participants"] = json.loads(rec["participants"])
            rec["selected"] = json.loads(rec["selected"])
            rec["kind"] = rec["kind"] or "train"
            rec["stage"] = rec["stage"] or 0
            rec["device_metrics"] = json.loads(rec["device_metrics"]) if rec["device_metrics"] else None
            rec["metrics"] = json.loads(rec["metrics"]) if rec["metrics"] else None
            out.append(rec)
        return out

    def last_round(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return int(row[0] or 0)

    # -- rejections ------------------------------------------------------------------
    def reject(self, device: str | None, round_id: int | None, reason: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO rejections VALUES (?, ?, ?, ?)", (time.time(), device, round_id, reason))

    def rejections(self, last: int | None = None) -> list[dict]:
        """The run's rejections, oldest first; only the `last` ones if given (the status page)."""
        with self._lock:
            if last is None:
                rows = self._db.execute("SELECT ts, device, round, reason FROM rejections ORDER BY ts").fetchall()
            else:
                rows = self._db.execute("SELECT ts, device, round, reason FROM rejections ORDER BY ts DESC LIMIT ?",
                                        (last,)).fetchall()[::-1]
        return [{"ts": r[0], "device": r[1], "round": r[2], "reason": r[3]} for r in rows]

    def rejection_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
