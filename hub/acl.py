"""Mosquitto ACL for one fleet: the hub may do everything under its fleet, a device (MQTT
username == device id) may publish only its own status and update and read only the model,
the round task and the hub's status. Pure text generation, so it is unit-testable; `fedge acl`
writes it to a file.

The rules follow the topic table of docs/protocol.md section 2:

    {prefix}/{fleet}/hub/status            hub writes, devices read
    {prefix}/{fleet}/model                 hub writes, devices read
    {prefix}/{fleet}/round                 hub writes, devices read
    {prefix}/{fleet}/dev/{device}/status   that device writes, hub reads
    {prefix}/{fleet}/dev/{device}/update   that device writes, hub reads

Mosquitto substitutes `%u` in `pattern` lines with the connecting client's username, so one
pattern covers every device; a device can neither write another device's topics nor read
any device's updates. A client whose username contains `/`, `+` or `#` matches no pattern.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

from fedge.models.errors import ConfigError
from fedge.models.wire.topics import ROOT, Topics, check_name

_USER = re.compile(r"^[^\s/+#%]{1,64}$")


def check_prefix(prefix: str) -> str:
    """A topic root usable in ACL lines: levels without wildcards, '%' (pattern escapes) or spaces."""
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise ConfigError(f"topic prefix {prefix!r} must be non-empty levels separated by single '/'")
    if re.search(r"[\s+#%]", prefix):
        raise ConfigError(f"topic prefix {prefix!r} may not contain spaces, '+', '#' or '%'")
    return prefix


def check_user(user: str, what: str = "hub user") -> str:
    if not isinstance(user, str) or not _USER.match(user):
        raise ConfigError(f"{what} {user!r} must be 1-64 characters without spaces, '/', '+', '#' or '%'")
    return user


def device_rules(fleet: str, prefix: str = ROOT) -> list[tuple[str, str]]:
    """(access, topic pattern) pairs every device gets; `%u` is the device's username."""
    t = Topics(check_name(fleet, "fleet id"), check_prefix(prefix))
    return [
        ("write", f"{t.base}/dev/%u/status"),
        ("write", f"{t.base}/dev/%u/update"),
        ("read", t.model),
        ("read", t.round),
        ("read", t.hub_status),
    ]


def mosquitto_acl(fleet: str, prefix: str = ROOT, hub_user: str = "hub") -> str:
    """The text of a Mosquitto `acl_file` for one fleet."""
    rules = device_rules(fleet, prefix)
    base = Topics(fleet, prefix).base
    check_user(hub_user)
    lines = [
        f"# Mosquitto ACL for fedge fleet {fleet!r} under {prefix!r} (written by `fedge acl`).",
        "# Use with `allow_anonymous false` and a password_file: a device's MQTT username is its",
        "# device id (fedge agent --device-id ... --username <same id>).",
        "",
        "# Every device: publish only its own status and update; read the model, the round task",
        "# and the hub's status. (Pattern lines apply to all clients; the hub's own rules follow.)",
    ]
    lines += [f"pattern {access} {topic}" for access, topic in rules]
    lines += [
        "",
        f"# The hub: everything of fleet {fleet!r}.",
        f"user {hub_user}",
        f"topic readwrite {base}/#",
        "",
    ]
    return "\n".join(lines)


def set_passwords(password_file: str | Path, entries: Iterable[tuple[str, str]],
                  binary: str = "mosquitto_passwd") -> Path:
    """Create or update a Mosquitto password file with `mosquitto_passwd -b` (hashed entries).

    The first entry creates the file (`-c`) when it does not exist yet; existing users are
    updated in place, others are kept.
    """
    path = Path(password_file)
    for user, password in entries:
        check_user(user, "MQTT username")
        if not password:
            raise ConfigError(f"empty password for {user!r}")
        cmd = [binary, "-b", str(path), user, password]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            cmd.insert(1, "-c")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise FileNotFoundError(f"{binary} not found (apt-get install mosquitto-clients or mosquitto)") from None
        if out.returncode != 0:
            raise ConfigError(f"{binary} failed for {user!r}: {(out.stderr or out.stdout).strip()}")
    return path
