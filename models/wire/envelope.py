"""The fedge envelope: the one binary frame every model, round task, update and report travels in.

Layout (all integers big-endian), documented byte for byte in docs/protocol.md:

    offset 0   4 bytes  magic b"FEDG"
    offset 4   1 byte   protocol version (PROTOCOL_VERSION)
    offset 5   1 byte   flags (bit 0: HMAC tag follows the digest; bit 1: Ed25519 signature follows)
    offset 6   4 bytes  header length H
    offset 10  4 bytes  body length B
    offset 14  H bytes  header, UTF-8 JSON object
    then       B bytes  body (codec-defined)
    then       32 bytes SHA-256 of every byte before it
    then       32 bytes HMAC-SHA256 tag over the digest (only when flags bit 0 is set)
    then       64 bytes Ed25519 signature of the digest (only when flags bit 1 is set)

Torch-free on purpose: a device that only runs inference, or a device written in
another language, needs nothing but this file's rules.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import WireError

Signer = Callable[[bytes], bytes]  # digest -> 64-byte signature
Verifier = Callable[[bytes, bytes], bool]  # (digest, signature) -> valid?

MAGIC = b"FEDG"
PROTOCOL_VERSION = 1
FLAG_TAGGED = 0x01
FLAG_SIGNED = 0x02
SIGNATURE_SIZE = 64
_PREFIX = struct.Struct(">4sBBII")
PREFIX_SIZE = _PREFIX.size  # 14
DIGEST_SIZE = 32
TAG_SIZE = 32
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024

KINDS = ("model", "task", "update", "report")


def body_size(payload: bytes) -> int:
    """The body's length, read from the prefix of an envelope already decoded once: what the
    codec cost, without the header and digest (the hub records it per round)."""
    return int(_PREFIX.unpack_from(payload)[4])


class EnvelopeError(WireError):
    """A message that is not a valid fedge envelope; the text says exactly why."""


@dataclass
class Envelope:
    """A decoded message: JSON header plus opaque body (interpreted by a codec)."""

    header: dict[str, Any]
    body: bytes = b""
    tag: bytes | None = field(default=None, repr=False)
    signature: bytes | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(self.header.get("kind", ""))


def encode(header: dict[str, Any], body: bytes = b"", key: bytes | None = None, signer: Signer | None = None) -> bytes:
    """Frame header and body. With `key`, append an HMAC-SHA256 tag of the digest (device
    updates); with `signer`, an Ed25519 signature of the digest (hub models and tasks)."""
    if not isinstance(header, dict):
        raise TypeError("envelope header must be a dict")
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    flags = (FLAG_TAGGED if key is not None else 0) | (FLAG_SIGNED if signer is not None else 0)
    framed = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, flags, len(head), len(body)) + head + bytes(body)
    digest = hashlib.sha256(framed).digest()
    out = framed + digest
    if key is not None:
        out += hmac.new(key, digest, hashlib.sha256).digest()
    if signer is not None:
        signature = signer(digest)
        if len(signature) != SIGNATURE_SIZE:
            raise ValueError(f"signer returned {len(signature)} bytes, expected {SIGNATURE_SIZE}")
        out += signature
    return out


def decode(
    data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, key: bytes | None = None, verifier: Verifier | None = None
) -> Envelope:
    """Parse and verify a frame; raise EnvelopeError (never anything else) on any defect.

    With `key`, an untagged message or a tag that does not match is rejected; with
    `verifier`, an unsigned message or a bad signature is rejected.
    """
    try:
        data = bytes(data)
    except Exception as exc:  # noqa: BLE001 - anything not bytes-like is a bad payload
        raise EnvelopeError(f"payload is not bytes: {type(data).__name__}") from exc
    if len(data) > max_bytes:
        raise EnvelopeError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < PREFIX_SIZE + DIGEST_SIZE:
        raise EnvelopeError(f"truncated: {len(data)} bytes is shorter than the minimal envelope")
    magic, version, flags, head_len, body_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise EnvelopeError(f"wrong magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise EnvelopeError(f"unsupported protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    if flags & ~(FLAG_TAGGED | FLAG_SIGNED):
        raise EnvelopeError(f"unknown flag bits 0x{flags:02x}")
    if head_len > MAX_HEADER_BYTES:
        raise EnvelopeError(f"header length {head_len} exceeds {MAX_HEADER_BYTES}")
    tagged, signed = bool(flags & FLAG_TAGGED), bool(flags & FLAG_SIGNED)
    expected = PREFIX_SIZE + head_len + body_len + DIGEST_SIZE + (TAG_SIZE if tagged else 0) + (
        SIGNATURE_SIZE if signed else 0)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise EnvelopeError(f"{what}: length {len(data)} but the prefix declares {expected}")
    end = PREFIX_SIZE + head_len + body_len
    digest = data[end : end + DIGEST_SIZE]
    if not hmac.compare_digest(hashlib.sha256(data[:end]).digest(), digest):
        raise EnvelopeError("digest mismatch: the message was corrupted or altered")
    trailer = end + DIGEST_SIZE
    tag = data[trailer : trailer + TAG_SIZE] if tagged else None
    signature = data[trailer + (TAG_SIZE if tagged else 0) :] if signed else None
    if verifier is not None:
        if signature is None:
            raise EnvelopeError("message is not signed but this receiver requires the hub's signature")
        try:
            valid = bool(verifier(digest, signature))
        except Exception:  # noqa: BLE001 - a verifier failure is a bad signature
            valid = False
        if not valid:
            raise EnvelopeError("signature does not verify with the hub's public key")
    if key is not None:
        if tag is None:
            raise EnvelopeError("message is not authenticated but this receiver requires a tag")
        if not hmac.compare_digest(hmac.new(key, digest, hashlib.sha256).digest(), tag):
            raise EnvelopeError("authentication tag does not match the sender's key")
    try:
        header = json.loads(data[PREFIX_SIZE : PREFIX_SIZE + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EnvelopeError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EnvelopeError(f"header must be a JSON object, got {type(header).__name__}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise EnvelopeError(f"unknown message kind {kind!r}; expected one of {KINDS}")
    return Envelope(header=header, body=data[PREFIX_SIZE + head_len : end], tag=tag, signature=signature)
