"""Key material: the hub's Ed25519 signing key (models and tasks) and per-device HMAC keys
(updates). Files, so enrolling a device is copying one file; `cryptography` is imported
only when keys are used.

Layout of a keys folder (`fedge keys init/enroll`):
    hub_ed25519.pem       hub private key (stays on the hub; mode 0600)
    hub_ed25519.pub       hub public key (copy to every device)
    devices/<id>.key      32-byte device key, hex (copy to that device only; mode 0600)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..errors import WireError
from .envelope import Signer, Verifier
from .topics import check_name

HUB_PRIVATE = "hub_ed25519.pem"
HUB_PUBLIC = "hub_ed25519.pub"


class KeyFileError(WireError):
    """A key file that is missing or malformed."""


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def init_hub_keys(folder: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - only key users pay its import
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415 - only key users pay its import

    folder = Path(folder)
    priv_path, pub_path = folder / HUB_PRIVATE, folder / HUB_PUBLIC
    if priv_path.exists() and not overwrite:
        raise KeyFileError(f"{priv_path} exists; pass overwrite to rotate the hub key")
    key = Ed25519PrivateKey.generate()
    _write_secret(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def enroll_device(folder: str | os.PathLike[str], device: str, overwrite: bool = False) -> Path:
    path = Path(folder) / "devices" / f"{check_name(device, 'device id')}.key"
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; pass overwrite to rotate this device's key")
    _write_secret(path, secrets.token_hex(32).encode() + b"\n")
    return path


def read_device_key(path: str | os.PathLike[str]) -> bytes:
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except FileNotFoundError:
        raise KeyFileError(f"device key file not found: {path}") from None
    except ValueError:
        raise KeyFileError(f"{path}: a device key is 64 hex characters") from None
    if len(key) < 16:
        raise KeyFileError(f"{path}: device key too short ({len(key)} bytes)")
    return key


def device_key(folder: str | os.PathLike[str], device: str) -> bytes | None:
    path = Path(folder) / "devices" / f"{device}.key"
    return read_device_key(path) if path.exists() else None


def hub_signer(folder_or_file: str | os.PathLike[str]) -> Signer:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - only key users pay its import
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415 - only key users pay its import

    path = Path(folder_or_file)
    path = path / HUB_PRIVATE if path.is_dir() else path
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"hub private key not found: {path} (run `fedge keys init`)") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: the hub key must be Ed25519, not {type(key).__name__}")
    return key.sign


def hub_verifier(folder_or_file: str | os.PathLike[str]) -> Verifier:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - only key users pay its import
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - only key users pay its import
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415 - only key users pay its import

    path = Path(folder_or_file)
    path = path / HUB_PUBLIC if path.is_dir() else path
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"hub public key not found: {path}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{path}: the hub key must be Ed25519, not {type(public).__name__}")

    def verify(digest: bytes, signature: bytes) -> bool:
        try:
            public.verify(signature, digest)
            return True
        except InvalidSignature:
            return False

    return verify
