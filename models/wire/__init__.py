"""Torch-free wire format: envelope, tensor codecs, topics, MQTT transport settings."""

from .codecs import CODECS, check_against, decode_tensors, encode_tensors
from .envelope import PROTOCOL_VERSION, Envelope, EnvelopeError, decode, encode
from .topics import Topics, check_name

__all__ = [
    "CODECS",
    "PROTOCOL_VERSION",
    "Envelope",
    "EnvelopeError",
    "Topics",
    "check_against",
    "check_name",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
]
