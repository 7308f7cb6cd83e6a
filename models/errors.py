"""One base for every error fedge raises on purpose, so a caller (the CLI, the hub's intake) can
catch fedge's own errors by one name without swallowing programming errors (TypeError, KeyError...).

Each child names a kind of cause, which is what a caller acts on:
- ConfigError: a setting, flag, profile or partition spec that cannot work;
- DataError: a data file that is missing, unreadable or of the wrong shape;
- WireError: bytes from the network (or a key file) that are malformed, unauthenticated or refused;
- ModelFileError: a model, mask or ONNX file that cannot be read, exported or served.

Each module's named error (ProfileError, PartitionError, EnvelopeError, KeyFileError, MaskFileError,
GraphError, ExportError, InferenceError) is a child of one of these, so old `except` clauses keep
working. All four are also ValueErrors, as the errors they replaced were. A check that can only
fail through a programming mistake (wrong argument type, an empty list where the caller guarantees
one) stays a plain ValueError/TypeError: the CLI must show its traceback, not an "error:" line.
"""

from __future__ import annotations


class FedgeError(Exception):
    """Base of fedge's own errors; the message is written for the person who has to fix the input."""


class ConfigError(FedgeError, ValueError):
    """A setting, command-line flag, profile or partition spec that cannot work."""


class DataError(FedgeError, ValueError):
    """A data file that is missing, unreadable or holds the wrong shape or values."""


class WireError(FedgeError, ValueError):
    """Bytes from the network (or a key file) that are malformed, unauthenticated or refused."""


class ModelFileError(FedgeError, ValueError):
    """A model, mask or ONNX file that cannot be read, exported or served."""
