"""`fedge keys` (hub signing key, per-device update keys) and `fedge acl` (Mosquitto ACL and
password file for a fleet). See docs/operations.md for the whole enrolment walk-through."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from fedge.models.errors import ConfigError
from fedge.models.wire.topics import ROOT, check_name

KEYS_EPILOG = """\
examples:
  fedge keys init --dir /etc/fedge/keys                 # once, on the hub
  fedge keys enroll pi-kitchen pi-garage --dir /etc/fedge/keys
  fedge keys list --dir /etc/fedge/keys
  fedge keys enroll pi-kitchen --dir /etc/fedge/keys --force   # rotate one device's key
  fedge keys init --dir /etc/fedge/keys --force         # rotate the hub key (re-copy the .pub to every device)

The hub uses the folder with `fedge hub --keys-dir DIR`; a device needs two files:
`fedge agent --hub-public-key hub_ed25519.pub --device-key <id>.key`.
"""

ACL_EPILOG = """\
examples:
  fedge acl --fleet home --keys-dir /etc/fedge/keys --out /etc/mosquitto/fedge-home.acl
  fedge acl --fleet home --devices pi-kitchen pi-garage --out /etc/mosquitto/fedge-home.acl \\
            --password-file /etc/mosquitto/passwd --passwords hub@home=S3cret pi-kitchen@home=An0ther
  cat /etc/mosquitto/fedge-*.acl > /etc/mosquitto/fedge.acl   # several fleets on one broker

MQTT usernames are qualified by fleet: DEVICE@FLEET for a device, hub@FLEET for the hub
(--hub-user overrides; give every fleet its own). The file has only `user` blocks, so the
output for several fleets may be concatenated. Re-run it after enrolling a device and reload
mosquitto. Passwords on the command line are visible in `ps`; on a shared machine add users
interactively instead: mosquitto_passwd FILE USER.
"""


def _fingerprint(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256: compare with `sha256sum FILE` on the device."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _mode_warning(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    return f"  WARNING: mode {mode:04o}, should be 0600" if mode & 0o077 else ""


# ----------------------------------------------------------------------------- keys
def add_keys_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "keys", help="hub signing key and per-device update keys",
        description="Create the hub's Ed25519 key pair (it signs every model and round task) and one "
                    "secret HMAC key per device (it tags that device's updates). --force rotates a key.",
        epilog=KEYS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="create the hub's key pair (hub_ed25519.pem / .pub)")
    init.add_argument("--dir", required=True, help="keys folder (the hub's --keys-dir)")
    init.add_argument("--force", action="store_true", help="replace an existing hub key (rotation)")
    init.set_defaults(func=run_keys_init)

    enroll = sub.add_parser("enroll", help="create a key for each device (devices/<id>.key)")
    enroll.add_argument("devices", nargs="+", metavar="DEVICE", help="device ids (= their MQTT usernames)")
    enroll.add_argument("--dir", required=True, help="keys folder (the hub's --keys-dir)")
    enroll.add_argument("--force", action="store_true", help="replace existing device keys (rotation)")
    enroll.set_defaults(func=run_keys_enroll)

    lst = sub.add_parser("list", help="show the hub key and the enrolled devices")
    lst.add_argument("--dir", required=True, help="keys folder")
    lst.set_defaults(func=run_keys_list)
    return p


def run_keys_init(args: argparse.Namespace) -> int:
    from fedge.models.wire.keys import HUB_PRIVATE, init_hub_keys  # noqa: PLC0415

    folder = Path(args.dir)
    if (folder / HUB_PRIVATE).exists() and not args.force:
        raise ConfigError(f"{folder / HUB_PRIVATE} exists; pass --force to rotate the hub key "
                         "(every device then needs the new public key)")
    rotated = (folder / HUB_PRIVATE).exists()
    folder.mkdir(parents=True, exist_ok=True)
    priv, pub = init_hub_keys(folder, overwrite=True)
    print(f"{'rotated' if rotated else 'created'} hub key pair in {folder}")
    print(f"  private: {priv}  (stays on the hub; start it with --keys-dir {folder})")
    print(f"  public:  {pub}  (copy to every device: fedge agent --hub-public-key {pub.name})")
    print(f"  fingerprint of the public key file: {_fingerprint(pub)}")
    if rotated:
        print("restart the hub (fedge hub --resume RUN) and copy the new public key to every device; "
              "until then devices drop the hub's models and tasks as 'signature does not verify'")
    return 0


def run_keys_enroll(args: argparse.Namespace) -> int:
    from fedge.hub.acl import HUB_NAME  # noqa: PLC0415 - with the command, like the rest
    from fedge.models.wire.keys import HUB_PUBLIC, enroll_device  # noqa: PLC0415

    folder = Path(args.dir)
    devices = list(dict.fromkeys(check_name(d, "device id") for d in args.devices))
    if HUB_NAME in devices:  # the hub is not enrolled: it has the key pair of `fedge keys init`
        raise ConfigError(f"{HUB_NAME!r} is not a device id: the hub's keys come from `fedge keys init --dir {folder}`, "
                          f"and a device called {HUB_NAME!r} would log in as {HUB_NAME}@FLEET, the hub's MQTT username; "
                          f"enroll each device by its own id (nothing was written)")
    existing = [d for d in devices if (folder / "devices" / f"{d}.key").exists()]
    if existing and not args.force:
        raise ConfigError(f"already enrolled: {', '.join(existing)}; pass --force to rotate their keys "
                         "(nothing was written)")
    pub = folder / HUB_PUBLIC
    for device in devices:
        path = enroll_device(folder, device, overwrite=True)
        action = "rotated" if device in existing else "enrolled"
        print(f"{action} {device}: copy {path} to device {device} only "
              f"(fedge agent --device-id {device} --username {device}@FLEET --device-key {path.name}"
              f" --hub-public-key {HUB_PUBLIC})  fingerprint {_fingerprint(path)}")
    if not pub.exists():
        print(f"note: no hub key in {folder} yet; run `fedge keys init --dir {folder}`", file=sys.stderr)
    else:
        print(f"every device also needs {pub}; the hub picks up new or rotated device keys "
              "with the next update (no restart)")
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    from fedge.models.wire.keys import HUB_PRIVATE, HUB_PUBLIC  # noqa: PLC0415

    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"keys folder {folder} does not exist (fedge keys init --dir {folder})")
    priv, pub = folder / HUB_PRIVATE, folder / HUB_PUBLIC
    if priv.exists() and pub.exists():
        print(f"hub key: {pub}  fingerprint {_fingerprint(pub)}{_mode_warning(priv)}")
    elif pub.exists():
        print(f"hub key: public key only ({pub}); this folder cannot sign (not the hub's)")
    else:
        print(f"hub key: none (fedge keys init --dir {folder})")
    keys = sorted((folder / "devices").glob("*.key")) if (folder / "devices").is_dir() else []
    print(f"{len(keys)} enrolled device(s)")
    for path in keys:
        print(f"  {path.stem:24s} {_fingerprint(path)}{_mode_warning(path)}")
    return 0


# ----------------------------------------------------------------------------- acl
def _password_entry(text: str) -> tuple[str, str]:
    user, sep, password = text.partition("=")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"{text!r}: expected USER=PASSWORD")
    return user, password


def add_acl_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "acl", help="write a Mosquitto ACL (and password file) for a fleet",
        description="Write a Mosquitto acl_file for one fleet: the hub user (hub@FLEET) may read and write "
                    "everything under PREFIX/FLEET/#; each device (MQTT username DEVICE@FLEET) may publish only "
                    "its own status and update topics and read only the model, the round task and the hub "
                    "status. Outputs for several fleets concatenate into one file without opening one fleet "
                    "to another. Optionally create or update a password file with mosquitto_passwd.",
        epilog=ACL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument("--topic-prefix", default=ROOT, help="topic root (default: %(default)s)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE", default=[], help="the fleet's device ids")
    p.add_argument("--keys-dir", help="also take the device ids enrolled in this keys folder (devices/*.key)")
    p.add_argument("--hub-user", default=None, help="the hub's MQTT username (default: hub@FLEET)")
    p.add_argument("--out", help="write the ACL to this file (default: print it)")
    p.add_argument("--passwords", nargs="+", type=_password_entry, metavar="USER=PASSWORD", default=[],
                   help="users to add or update in --password-file (devices: USER = DEVICE@FLEET)")
    p.add_argument("--password-file", help="Mosquitto password file to create or update (needs mosquitto_passwd)")
    p.set_defaults(func=run_acl)
    return p


def run_acl(args: argparse.Namespace) -> int:
    from fedge.hub.acl import mosquitto_acl, set_passwords  # noqa: PLC0415

    if bool(args.passwords) != bool(args.password_file):
        raise ConfigError("--passwords and --password-file go together")
    devices = list(args.devices)
    if args.keys_dir:
        folder = Path(args.keys_dir) / "devices"
        if not folder.is_dir():
            raise FileNotFoundError(f"--keys-dir {args.keys_dir}: no devices/ folder (fedge keys enroll ...)")
        devices += sorted(path.stem for path in folder.glob("*.key"))
    if not devices:
        raise ConfigError("name the fleet's devices: --devices ID... or --keys-dir DIR (the enrolled ones)")
    text = mosquitto_acl(args.fleet, devices, args.topic_prefix, args.hub_user)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out} (acl_file {out.resolve()} in mosquitto.conf; reload mosquitto to apply)")
    else:
        sys.stdout.write(text)
    if args.password_file:
        path = set_passwords(args.password_file, args.passwords)
        users = ", ".join(user for user, _ in args.passwords)
        print(f"password file {path}: set {users}", file=sys.stderr if not args.out else sys.stdout)
    return 0
