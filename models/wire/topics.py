"""MQTT topic names: the single place both sides learn where a message lives."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

ROOT = "fedge/v1"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(value: str, what: str) -> str:
    """Fleet and device ids become topic levels, so they may not contain / + # or spaces."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.' or '-'")
    return value


@dataclass(frozen=True)
class Topics:
    """Topics of one fleet. `prefix` lets test runs (or tenants) share a broker without crosstalk."""

    fleet: str
    prefix: str = ROOT

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet id")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def hub_status(self) -> str:
        return f"{self.base}/hub/status"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    def device_status(self, device: str) -> str:
        return f"{self.base}/dev/{check_name(device, 'device id')}/status"

    def device_update(self, device: str) -> str:
        return f"{self.base}/dev/{check_name(device, 'device id')}/update"

    @property
    def all_device_status(self) -> str:
        return f"{self.base}/dev/+/status"

    @property
    def all_device_updates(self) -> str:
        return f"{self.base}/dev/+/update"

    def device_of(self, topic: str) -> str | None:
        """Device id from a dev/{id}/... topic, or None if the topic is not a device topic."""
        head = f"{self.base}/dev/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        return rest[0] if len(rest) == 2 else None
