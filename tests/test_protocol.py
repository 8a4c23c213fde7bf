"""Wire protocol: round trips for every message, strict decoding, tensor blobs, subjects."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.protocol import (
    ITEMSIZE,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Heartbeat,
    KVFetchReply,
    MalformedMessageError,
    Message,
    PrefillWork,
    ProtocolError,
    SchemaVersionError,
    TensorBlob,
    TokenEvent,
    UnexpectedMessageTypeError,
    UnknownMessageTypeError,
    decode,
    encode,
    from_blob,
    subjects,
    to_blob,
)

_QUIET = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
FAST = settings(max_examples=30, **_QUIET)
MANY = settings(max_examples=100, **_QUIET)
INT64 = st.integers(-(2**63), 2**64 - 1)
FLOATS = st.floats(allow_nan=False)
PLAIN = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def tensor_blobs(draw: st.DrawFn) -> TensorBlob:
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return TensorBlob(dtype=dtype, shape=shape, data=draw(st.binary(min_size=n, max_size=n)))


OVERRIDES: dict[Any, st.SearchStrategy] = {TensorBlob: tensor_blobs()}


def strategy_for(tp: Any) -> st.SearchStrategy:
    """A strategy for any annotation the codec supports, derived from the type alone."""
    if tp in OVERRIDES:
        return OVERRIDES[tp]
    scalars = {int: INT64, float: FLOATS, str: st.text(max_size=12), bool: st.booleans(),
               bytes: st.binary(max_size=16), type(None): st.none(), Any: PLAIN}
    if tp in scalars:
        return scalars[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if tp is list or origin is list:
        return st.lists(strategy_for(args[0] if args else Any), max_size=3)
    if tp is dict:
        return st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), PLAIN, max_size=3)
    if isinstance(tp, type) and issubclass(tp, Message):
        hints = get_type_hints(tp)
        fields = {f.name: st.deferred(lambda t=hints[f.name]: strategy_for(t))
                  for f in dataclasses.fields(tp)}
        return st.builds(tp, **fields)
    raise TypeError(f"no strategy for {tp!r}")


ALL_TYPES = sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)


def wire(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def hb(**kw: Any) -> Heartbeat:
    return Heartbeat(**{"worker_id": "w1", "role": "decode", "state": "ready", "seq": 1, "ts": 2.5,
                        **kw})


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip_every_message(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(strategy_for(cls))
    out = decode(encode(msg), expected=cls)
    assert out == msg
    assert type(out) is cls


def test_wire_form_is_a_versioned_tagged_map() -> None:
    m = wire(TokenEvent(request_id="r", index=3, token_ids=[7]))
    assert m["v"] == SCHEMA_VERSION and m["t"] == "token"
    assert m["index"] == 3 and m["token_ids"] == [7]


def test_every_class_is_frozen_and_has_a_docstring() -> None:
    for cls in ALL_TYPES:
        assert cls.__doc__ and dataclasses.fields(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_float_accepts_int_and_defaults_fill_missing_fields() -> None:
    m = wire(hb())
    m["ts"] = 7
    for name in ("model", "capacity", "step_time_ms"):
        del m[name]
    m["future_field"] = {"ignored": True}
    out = decode(pack(m), Heartbeat)
    assert out.ts == 7.0 and type(out.ts) is float
    assert out == hb(ts=7.0)


# --- decode errors ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None])
def test_wrong_schema_version(version: Any) -> None:
    m = wire(hb())
    m["v"] = version
    with pytest.raises(SchemaVersionError):
        decode(pack(m))
    del m["v"]
    with pytest.raises(SchemaVersionError):
        decode(pack(m))


def test_truncated_bytes_and_non_maps_are_malformed() -> None:
    data = encode(hb())
    for n in range(len(data)):
        with pytest.raises(MalformedMessageError):
            decode(data[:n])
    for obj in ([1, 2], "x", 3, None):
        with pytest.raises(MalformedMessageError):
            decode(pack(obj))
    with pytest.raises(MalformedMessageError):
        decode(data + b"\x00")


def test_unknown_and_unexpected_types() -> None:
    m = wire(hb())
    m["t"] = "no_such_message"
    with pytest.raises(UnknownMessageTypeError):
        decode(pack(m))
    m["t"] = 5
    with pytest.raises(MalformedMessageError):
        decode(pack(m))
    with pytest.raises(UnexpectedMessageTypeError):
        decode(encode(hb()), expected=TokenEvent)
    with pytest.raises(UnexpectedMessageTypeError):
        decode(encode(hb()), expected=(TokenEvent, PrefillWork))
    assert isinstance(decode(encode(hb()), expected=(TokenEvent, Heartbeat)), Heartbeat)


def wrong_value(tp: Any) -> Any:
    """A msgpack value that annotation `tp` must reject."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return wrong_value(next(a for a in args if a is not type(None)))
    if origin is Literal:
        return "not-a-member"
    table = {int: "1", float: "1.5", str: 1, bool: 1, bytes: "b", list: {"a": 1}, dict: [1]}
    return table.get(origin or tp, 1)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=5, **_QUIET)
@given(data=st.data())
def test_every_field_rejects_a_wrong_type(cls: type[Message], data: st.DataObject) -> None:
    good = wire(data.draw(strategy_for(cls)))
    for name, tp in get_type_hints(cls).items():
        if name in good:
            with pytest.raises(MalformedMessageError, match=name):
                decode(pack({**good, name: wrong_value(tp)}))


@pytest.mark.parametrize("field,value", [
    ("token_ids", [1, "2"]), ("token_ids", [1, True]), ("index", True), ("index", 1.0),
    ("request_id", b"r"), ("logprobs", [1]), ("logprobs", [{"a": msgpack.ExtType(5, b"x")}]),
    ("finish_reason", 0),
])
def test_specific_wrong_types(field: str, value: Any) -> None:
    m = wire(TokenEvent(request_id="r", index=0, token_ids=[1]))
    m[field] = value
    with pytest.raises(MalformedMessageError):
        decode(pack(m))


def test_missing_required_field_and_nested_errors() -> None:
    m = wire(hb())
    del m["worker_id"]
    with pytest.raises(MalformedMessageError, match="worker_id"):
        decode(pack(m))
    blob = TensorBlob(dtype="float32", shape=[2], data=b"\0" * 8)
    m = wire(KVFetchReply(request_id="r", chunk_index=0, last=True, blocks=[blob, blob]))
    m["blocks"][1]["data"] = b"\0" * 7
    with pytest.raises(MalformedMessageError, match=r"blocks\[1\]"):
        decode(pack(m))


def test_encode_rejects_bad_fields() -> None:
    for bad in (hb(seq="1"), hb(role="leader"), hb(pid=True), hb(ts="now")):
        with pytest.raises(MalformedMessageError):
            encode(bad)
    with pytest.raises(MalformedMessageError):
        encode(hb(seq=2**70))
    with pytest.raises(MalformedMessageError):
        encode(object())  # type: ignore[arg-type]


@MANY
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


@MANY
@given(data=st.data())
def test_mutated_encodings_raise_only_protocol_errors(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(ALL_TYPES).flatmap(strategy_for))
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del raw[i:i + data.draw(st.integers(1, 4))]
        else:
            del raw[i:]
    try:
        decode(bytes(raw))
    except ProtocolError:
        pass


@MANY
@given(tag=st.sampled_from(sorted(MESSAGE_TYPES)), body=st.dictionaries(st.text(max_size=12), PLAIN))
def test_random_fields_under_a_real_tag_raise_only_protocol_errors(tag: str, body: dict) -> None:
    try:
        decode(pack({**body, "v": SCHEMA_VERSION, "t": tag}))
    except ProtocolError:
        pass


def test_deep_nesting_in_a_free_form_field() -> None:
    m = wire(PrefillWork(request_id="r", prompt_token_ids=[1], params={}, model="m", reply="x",
                         arrival_ts=0.0))
    deep: Any = 1
    for _ in range(900):
        deep = [deep]
    m["params"] = {"a": deep}
    decode(pack(m))
    raw = b"\x81\xa1v\x01" + b"\x91" * 5000
    with pytest.raises(ProtocolError):
        decode(raw)


# --- tensors ----------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 4), (), (0, 5), (7,)])
def test_tensor_blob_round_trip(name: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[name]
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
        if t.numel() >= 4:
            t.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    elif dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g,
                          dtype=dtype)
    blob = to_blob(t)
    assert blob.dtype == name and blob.shape == list(shape) and len(blob.data) == blob.nbytes
    out = from_blob(decode(encode(blob), TensorBlob))
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(_bits(out), _bits(t))


def test_tensor_blob_of_a_non_contiguous_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(from_blob(to_blob(t)), t)


def test_tensor_blob_validation() -> None:
    with pytest.raises(ValueError):
        TensorBlob(dtype="float32", shape=[3], data=b"\0" * 8)
    with pytest.raises(ValueError):
        TensorBlob(dtype="float32", shape=[-1], data=b"")
    with pytest.raises(ValueError):
        to_blob(torch.zeros(2, dtype=torch.float64))
    m = wire(TensorBlob(dtype="int32", shape=[2], data=b"\0" * 8))
    for key, value in (("data", b"\0" * 9), ("dtype", "float64"), ("shape", [2, -1])):
        with pytest.raises(MalformedMessageError):
            decode(pack({**m, key: value}))
    with pytest.raises(MalformedMessageError):
        from_blob(TensorBlob(dtype="bool", shape=[2], data=b"\x01\x02"))


# --- subjects ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "a b", "a\tb", "x" * 129, 5])
def test_subject_token_rejects_bad_ids(bad: Any) -> None:
    with pytest.raises(ValueError):
        subjects.token(bad)
    with pytest.raises(ValueError):
        subjects.tokens_subject(bad)


def test_subject_builders() -> None:
    assert subjects.token("req-1_A") == "req-1_A"
    assert subjects.tokens_subject("r1") == "epd.tokens.r1"
    assert subjects.work_subject("prefill", "offline") == "epd.work.prefill.offline"
    assert subjects.role_subject("w1") == "epd.ctl.role.w1"
