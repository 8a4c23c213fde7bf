"""Errors raised by the wire codec.

decode() raises only these, whatever bytes it is given, so a consumer loop can catch
ProtocolError, count it by `.code` and terminate the message instead of crashing.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every codec error; `code` is a stable short name for metrics and logs."""

    code: str = "protocol_error"


class SchemaVersionError(ProtocolError):
    """The message has no schema version, or one this build does not speak."""

    code = "schema_version"


class MalformedMessageError(ProtocolError):
    """Not msgpack, not a map, truncated, a missing field, or a field of the wrong type.

    encode() raises it too when a message holds a value its annotation does not allow.
    """

    code = "malformed"


class UnknownMessageTypeError(ProtocolError):
    """The type tag names no registered message class."""

    code = "unknown_type"


class UnexpectedMessageTypeError(ProtocolError):
    """The message decoded fine but is not one of the types the caller expected."""

    code = "unexpected_type"
