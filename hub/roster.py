"""The devices a hub has heard from: who is online now, and the sample count each announced when
it joined, which bounds the weight its updates may claim (protocol.md, admission of updates)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fedge.models.wire.messages import DECLINED_KINDS

log = logging.getLogger("fedge.hub")


class Roster:
    """Not locked on its own: the hub calls it under its round lock, with the rest of its state."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self._online: dict[str, dict[str, Any]] = {}
        self._announced: dict[str, int | None] = {}  # device -> num_samples announced when it joined
        self._known: dict[str, dict[str, Any]] = {}  # every device ever heard from: its last status
        self._last_seen: dict[str, float] = {}  # device -> time of its last status or answer

    def __len__(self) -> int:
        return len(self._online)

    def online(self) -> list[str]:
        return sorted(self._online)

    def status(self, device: str) -> dict[str, Any] | None:
        """The latest status of an online device (None: offline or never seen)."""
        return self._online.get(device)

    def update(self, device: str, info: dict[str, Any]) -> None:
        """Apply a parsed status message (an `online` one may join the device, `offline` drops it)."""
        self._last_seen[device] = time.time()
        if info["state"] == "online" or device not in self._known:
            self._known[device] = info
        if info["state"] != "online":
            if self._online.pop(device, None) is not None:
                log.info("device %s offline (%d online)", device, len(self._online))
            return
        if device not in self._online:
            self._join(device, info)
            profile = info.get("profile") if isinstance(info.get("profile"), dict) else {}
            log.info("device %s online: %s samples, profile %s (%d online)", device, info.get("num_samples"),
                     profile.get("name", "?"), len(self._online) + 1)
        else:
            log.debug("status of %s: %s", device, info)
        self._log_refusal(device, info, self._online.get(device))
        self._online[device] = info

    def seen(self, device: str) -> None:
        """Note an answer from a known device: last seen is its last message of any kind."""
        if device in self._known:
            self._last_seen[device] = time.time()

    def devices(self) -> list[dict[str, Any]]:
        """Every device heard from, online or not, for the status page: id, online, last seen
        (epoch seconds), its profile's name and the sample count it announces."""
        out = []
        for device in sorted(self._known):
            info = self._known[device]
            profile = info.get("profile")
            samples = info.get("num_samples")
            out.append({"id": device, "online": device in self._online, "last_seen": self._last_seen.get(device),
                        "profile": profile.get("name") if isinstance(profile, dict) else None,
                        "num_samples": samples if isinstance(samples, int) and not isinstance(samples, bool) else None})
        return out

    def _join(self, device: str, info: dict[str, Any]) -> None:
        """Remember the sample count a device announces when it comes online: its updates may
        claim no more (a re-announcement while online cannot raise it)."""
        count = info.get("num_samples")
        valid = isinstance(count, int) and not isinstance(count, bool) and count > 0
        self._announced[device] = count if valid else None
        if not valid:
            log.warning("device %s announced no valid num_samples (%r): its updates will be rejected", device, count)
        elif count > self.max_samples:
            log.warning("device %s announces %d samples, above max_samples=%d: its updates will be rejected",
                        device, count, self.max_samples)

    @staticmethod
    def _log_refusal(device: str, info: dict[str, Any], before: dict[str, Any] | None) -> None:
        """A device that refused a round (edge_agent/task_checks.py), or whose job for it failed,
        says why in its status."""
        for kind in DECLINED_KINDS:
            record = info.get(kind)
            if isinstance(record, dict) and (before is None or before.get(kind) != record):
                log.warning("device %s %s round %s: %s", device, kind, record.get("round"), record.get("reason"))

    def sample_bound(self, device: str, claimed: int) -> str | None:
        """Why an update's num_samples (its weight in FedAvg) is not believable, or None."""
        if device not in self._announced:  # e.g. queued while the hub was down; the agent re-sends
            return "no status seen from this device yet, so its weight has no bound"
        announced = self._announced[device]
        if announced is None:
            return "its device announced no num_samples in its status, so its weight has no bound"
        if claimed > announced:
            return f"claims num_samples={claimed}, above the {announced} its device announced when it joined"
        if claimed > self.max_samples:
            return f"claims num_samples={claimed}, above the hub's max_samples={self.max_samples}"
        return None
