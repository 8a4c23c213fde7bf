"""The one msgpack codec for every wire message.

Wire form of a message: a msgpack map ``{"v": SCHEMA_VERSION, "t": <TYPE tag>, <field>: ...}``.
A message nested in a field is a plain map of its fields (its type comes from the annotation).
Bytes travel as msgpack bin, text as str, lists as arrays.

Field types allowed in a message annotation: int, float, str, bool, bytes, None, Any,
``Literal[...]``, ``X | Y``, ``list[X]``, ``dict[K, V]``, bare ``list`` / ``dict`` (any plain
msgpack values inside) and registered Message classes. Checks are strict: bool is not an int,
an int is not a str; only float widens (an int is accepted and becomes a float).

Compatibility within one schema version: decode ignores keys it does not know and fills a
missing field from its dataclass default; a missing field without a default is malformed.
So adding a field *with a default* needs no version bump; removing, renaming or retyping does.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import (
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    overload,
)

import msgpack

from shared.protocol.errors import (
    MalformedMessageError,
    SchemaVersionError,
    UnexpectedMessageTypeError,
    UnknownMessageTypeError,
)

SCHEMA_VERSION = 1
_RESERVED = frozenset({"v", "t"})


class Message:
    """Base of every wire type: a frozen, slotted, keyword-only dataclass with a unique TYPE."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""


M = TypeVar("M", bound=Message)
_REGISTRY: dict[str, type[Message]] = {}
MESSAGE_TYPES: types.MappingProxyType[str, type[Message]] = types.MappingProxyType(_REGISTRY)


def register(cls: type[M]) -> type[M]:
    """Class decorator (outermost, above @dataclass): make `cls` decodable under cls.TYPE.

    Raises TypeError if cls is not a Message dataclass, has no TYPE of its own, reuses a tag,
    or has a field named 'v' or 't'.
    """
    if not (isinstance(cls, type) and issubclass(cls, Message) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclassing Message")
    tag = cls.__dict__.get("TYPE")
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"{cls.__name__} must set its own TYPE tag")
    if tag in _REGISTRY:
        raise TypeError(f"type tag {tag!r} already used by {_REGISTRY[tag].__name__}")
    clash = _RESERVED & {f.name for f in dataclasses.fields(cls)}
    if clash:
        raise TypeError(f"{cls.__name__} uses reserved field name(s) {sorted(clash)}")
    _REGISTRY[tag] = cls
    return cls


class _Invalid(Exception):
    """Internal: a value does not fit its annotation; `path` is built innermost first."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.path: list[str] = []

    def where(self, root: str) -> str:
        return root + "".join(reversed(self.path)) + ": " + str(self)


def _want(what: str, value: Any) -> _Invalid:
    return _Invalid(f"expected {what}, got {type(value).__name__}")


_Conv = Callable[[Any], Any]
_SCALARS: dict[Any, tuple[str, Callable[[Any], bool], Callable[[Any], bool]]] = {
    # type: (name, accepted on decode, accepted on encode)
    int: ("int", lambda v: type(v) is int, lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("str", lambda v: type(v) is str, lambda v: isinstance(v, str)),
    bool: ("bool", lambda v: type(v) is bool, lambda v: isinstance(v, bool)),
    bytes: ("bytes", lambda v: type(v) is bytes,
            lambda v: isinstance(v, (bytes, bytearray, memoryview))),
    type(None): ("None", lambda v: v is None, lambda v: v is None),
}
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})  # also the allowed map keys


def _check_plain(value: Any) -> Any:
    """Accept only None/bool/int/float/str/bytes/list/map (iterative: depth cannot overflow)."""
    stack = [value]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is list:
            stack.extend(x)
        elif t is dict:
            for k in x:
                if type(k) not in _PLAIN:
                    raise _want("plain map key", k)
            stack.extend(x.values())
        elif t not in _PLAIN:
            raise _want("plain msgpack value", x)
    return value


def _each(conv: _Conv, items: Any, label: Callable[[int, Any], str]) -> list[Any]:
    """Convert every item; on failure put label(index, item) on the error path."""
    try:
        return [conv(x) for x in items]
    except _Invalid:
        for i, x in enumerate(items):
            try:
                conv(x)
            except _Invalid as e:
                e.path.append(label(i, x))
                raise
        raise


def _index(i: int, _: Any) -> str:
    return f"[{i}]"


def _build(tp: Any, decoding: bool) -> _Conv:
    """Compile a converter for annotation `tp` (decode: wire -> value; encode: value -> wire)."""
    if tp in _SCALARS:
        name, dec_ok, enc_ok = _SCALARS[tp]
        ok = dec_ok if decoding else enc_ok

        def scalar(v: Any) -> Any:
            if ok(v):
                return v
            raise _want(name, v)

        return scalar
    if tp is float:
        def flt(v: Any) -> float:
            if type(v) is float:
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            raise _want("float", v)

        return flt
    if tp is Any:
        return _check_plain if decoding else (lambda v: v)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        def literal(v: Any) -> Any:
            for a in args:
                if v == a and (type(v) is type(a) or not decoding and isinstance(v, type(a))
                               and not isinstance(v, bool)):
                    return v
            raise _Invalid(f"expected one of {list(args)}, got {v!r:.40}")

        return literal
    if origin in (Union, types.UnionType):
        nullable = type(None) in args
        arms = [_converter(a, decoding) for a in args if a is not type(None)]

        def union(v: Any) -> Any:
            if v is None and nullable:
                return None
            errors = []
            for arm in arms:
                try:
                    return arm(v)
                except _Invalid as e:
                    errors.append(e)
            raise errors[0] if len(errors) == 1 else _want(" | ".join(map(_name, args)), v)

        return union
    if tp is list or origin is list:
        item = _converter(args[0] if args else Any, decoding)
        fast = _SCALARS.get(args[0])[1 if decoding else 2] if args and args[0] in _SCALARS else None

        def seq(v: Any) -> list[Any]:
            if not (type(v) is list if decoding else isinstance(v, (list, tuple))):
                raise _want("list", v)
            if fast is not None and all(map(fast, v)):
                return v
            return _each(item, v, _index)

        return seq
    if tp is dict or origin is dict:
        if not args:
            return _plain_dict_dec if decoding else _plain_dict_enc
        key, val = _converter(args[0], decoding), _converter(args[1], decoding)

        def mapping(v: Any) -> dict[Any, Any]:
            if not isinstance(v, dict):
                raise _want("map", v)
            out = {}
            for k, x in v.items():
                try:
                    out[key(k)] = val(x)
                except _Invalid as e:
                    e.path.append(f"[{k!r:.40}]")
                    raise
            return out

        return mapping
    if isinstance(tp, type) and issubclass(tp, Message):
        return (lambda v: _decode_fields(tp, v)) if decoding else (lambda v: _encode_fields(tp, v))
    raise TypeError(f"unsupported wire field type {tp!r}")


def _plain_dict_dec(v: Any) -> Any:
    if type(v) is not dict:
        raise _want("map", v)
    return _check_plain(v)


def _plain_dict_enc(v: Any) -> Any:
    if not isinstance(v, dict):
        raise _want("map", v)
    return v


_CACHE: dict[tuple[Any, bool], _Conv] = {}
_FIELDS: dict[type[Message], list[tuple[str, _Conv, _Conv, bool]]] = {}


def _converter(tp: Any, decoding: bool) -> _Conv:
    conv = _CACHE.get((tp, decoding))
    if conv is None:
        conv = _CACHE[(tp, decoding)] = _build(tp, decoding)
    return conv


def _fields(cls: type[Message]) -> list[tuple[str, _Conv, _Conv, bool]]:
    """(name, decoder, encoder, required) per field, compiled once from the annotations."""
    spec = _FIELDS.get(cls)
    if spec is None:
        hints = get_type_hints(cls)
        spec = _FIELDS[cls] = [
            (f.name, _converter(hints[f.name], True), _converter(hints[f.name], False),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        ]
    return spec


def _decode_fields(cls: type[M], m: Any) -> M:
    if type(m) is not dict:
        raise _want(f"{cls.__name__} map", m)
    kwargs = {}
    for name, dec, _, required in _fields(cls):
        if name in m:
            try:
                kwargs[name] = dec(m[name])
            except _Invalid as e:
                e.path.append(f".{name}")
                raise
        elif required:
            raise _Invalid(f"missing field {name!r}")
    try:
        return cls(**kwargs)
    except Exception as e:  # __post_init__ invariants (ValueError/TypeError) and anything else
        raise _Invalid(f"invalid {cls.__name__}: {e}") from None


def _encode_fields(cls: type[Message], msg: Any) -> dict[str, Any]:
    if not isinstance(msg, cls):
        raise _want(cls.__name__, msg)
    out = {}
    for name, _, enc, _ in _fields(cls):
        try:
            out[name] = enc(getattr(msg, name))
        except _Invalid as e:
            e.path.append(f".{name}")
            raise
    return out


def encode(msg: Message) -> bytes:
    """Serialize a registered message. Raises MalformedMessageError if a field breaks its type."""
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "TYPE", "")) is not cls:
        raise MalformedMessageError(f"{cls.__name__} is not a registered message type")
    try:
        wire: dict[str, Any] = {"v": SCHEMA_VERSION, "t": cls.TYPE}
        wire.update(_encode_fields(cls, msg))
        return msgpack.packb(wire, use_bin_type=True)
    except _Invalid as e:
        raise MalformedMessageError("cannot encode " + e.where(cls.__name__)) from None
    except (TypeError, ValueError, OverflowError) as e:
        raise MalformedMessageError(f"cannot encode {cls.__name__}: {e}") from e


@overload
def decode(data: bytes | bytearray | memoryview, expected: type[M]) -> M: ...
@overload
def decode(data: bytes | bytearray | memoryview,
           expected: tuple[type[Message], ...] | None = None) -> Message: ...


def decode(data: bytes | bytearray | memoryview,
           expected: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Parse and type-check one message; if `expected` is given the result is an instance of it.

    Raises only ProtocolError subclasses for any input bytes: SchemaVersionError,
    MalformedMessageError, UnknownMessageTypeError, UnexpectedMessageTypeError.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:
        raise MalformedMessageError(f"not a msgpack message: {e}") from None
    if type(obj) is not dict:
        raise MalformedMessageError(f"message must be a msgpack map, got {type(obj).__name__}")
    if "v" not in obj:
        raise SchemaVersionError("message has no schema version 'v'")
    version = obj["v"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise SchemaVersionError(f"schema version {version!r:.40} (this build speaks {SCHEMA_VERSION})")
    tag = obj.get("t")
    if type(tag) is not str:
        raise MalformedMessageError("message has no type tag 't'")
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {tag!r:.60}")
    if expected is not None and not issubclass(cls, expected):
        raise UnexpectedMessageTypeError(f"got {cls.__name__}, expected {_names(expected)}")
    try:
        return _decode_fields(cls, obj)
    except _Invalid as e:
        raise MalformedMessageError(e.where(cls.__name__)) from None


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _names(expected: type | tuple[type, ...]) -> str:
    return " | ".join(map(_name, expected if isinstance(expected, tuple) else (expected,)))
