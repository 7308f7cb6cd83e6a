"""Mosquitto ACL for one fleet: the hub may do everything under its fleet, a device may
publish only its own status and update and read only the model, the round task and the hub's
status. Pure text generation, so it is unit-testable; `fedge acl` writes it to a file.

The rules follow the topic table of docs/protocol.md section 2:

    {prefix}/{fleet}/hub/status            hub writes, devices read
    {prefix}/{fleet}/model                 hub writes, devices read
    {prefix}/{fleet}/round                 hub writes, devices read
    {prefix}/{fleet}/dev/{device}/status   that device writes, hub reads
    {prefix}/{fleet}/dev/{device}/update   that device writes, hub reads

Every rule sits in a `user` block: Mosquitto applies `pattern` lines to every client of the
broker, so a pattern written for one fleet would also open that fleet's topics to the devices
of every other fleet on the same broker. MQTT usernames are qualified by fleet
(`<device>@<fleet>`, `hub@<fleet>`; '@' is not allowed in fleet or device ids, so two fleets
never share a username), which is why the output of `fedge acl` for several fleets can simply
be concatenated into one acl_file. The price: a newly enrolled device needs the ACL
regenerated (and Mosquitto reloaded), like its password entry.
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


def device_user(fleet: str, device: str) -> str:
    """The MQTT username of `device` in `fleet`: unique across the fleets of one broker."""
    return f"{check_name(device, 'device id')}@{check_name(fleet, 'fleet id')}"


HUB_NAME = "hub"  # the hub's name in its MQTT username (hub@FLEET): never a device id


def hub_user_of(fleet: str) -> str:
    """The default MQTT username of the fleet's hub."""
    return f"{HUB_NAME}@{check_name(fleet, 'fleet id')}"


def device_rules(fleet: str, device: str, prefix: str = ROOT) -> list[tuple[str, str]]:
    """(access, topic) pairs of one device of one fleet."""
    t = Topics(check_name(fleet, "fleet id"), check_prefix(prefix))
    return [
        ("write", t.device_status(device)),
        ("write", t.device_update(device)),
        ("read", t.model),
        ("read", t.round),
        ("read", t.hub_status),
    ]


def mosquitto_acl(fleet: str, devices: Iterable[str], prefix: str = ROOT, hub_user: str | None = None) -> str:
    """The text of a Mosquitto `acl_file` section for one fleet; sections of several fleets
    (each with its own hub user) concatenate into one file without opening one to another."""
    base = Topics(check_name(fleet, "fleet id"), check_prefix(prefix)).base
    hub = check_user(hub_user if hub_user is not None else hub_user_of(fleet))
    names = list(dict.fromkeys(check_name(d, "device id") for d in devices))
    clash = [d for d in names if device_user(fleet, d) == hub]
    if clash:
        raise ConfigError(f"device {clash[0]!r} would log in as {hub!r}, the hub's username; give it another id")
    lines = [
        f"# Mosquitto ACL for fedge fleet {fleet!r} under {prefix!r} (written by `fedge acl`).",
        "# Use with `allow_anonymous false` and a password_file. Only `user` blocks, no `pattern`",
        "# lines: sections written for other fleets may be appended to this file.",
        "",
        f"# The hub: everything of fleet {fleet!r}.",
        f"user {hub}",
        f"topic readwrite {base}/#",
    ]
    for device in names:
        lines += ["", f"# Device {device}: its own status and update; the model, the round task, the hub status.",
                  f"user {device_user(fleet, device)}"]
        lines += [f"topic {access} {topic}" for access, topic in device_rules(fleet, device, prefix)]
    lines.append("")
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
