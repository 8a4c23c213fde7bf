"""Wire protocol: typed messages, the msgpack codec, tensor blobs and subject names.

    from shared.protocol import PrefillWork, encode, decode, subjects
"""

from shared.protocol import subjects
from shared.protocol.codec import MESSAGE_TYPES, SCHEMA_VERSION, Message, decode, encode, register
from shared.protocol.errors import (
    MalformedMessageError,
    ProtocolError,
    SchemaVersionError,
    UnexpectedMessageTypeError,
    UnknownMessageTypeError,
)
from shared.protocol.messages import (
    ROLES,
    WORKER_STATES,
    CancelRequest,
    Chunk,
    ChunkRequest,
    DecodeWork,
    EncodeWork,
    ErrorEvent,
    FeatureRef,
    Heartbeat,
    ImageRef,
    KVEvent,
    KVEventKind,
    KVFetchReply,
    KVFetchRequest,
    KVHandle,
    KVTier,
    MMFeatures,
    PrefillWork,
    PriorityName,
    Role,
    RoleCommand,
    TokenEvent,
    WorkerState,
)
from shared.protocol.tensors import ITEMSIZE, DType, TensorBlob, from_blob, to_blob

__all__ = [
    "CancelRequest", "Chunk", "ChunkRequest", "DType", "DecodeWork", "EncodeWork", "ErrorEvent",
    "FeatureRef", "Heartbeat", "ITEMSIZE", "ImageRef", "KVEvent", "KVEventKind", "KVFetchReply",
    "KVFetchRequest", "KVHandle", "KVTier", "MESSAGE_TYPES", "MMFeatures", "MalformedMessageError",
    "Message", "PrefillWork", "PriorityName", "ProtocolError", "ROLES", "Role", "RoleCommand",
    "SCHEMA_VERSION", "SchemaVersionError", "TensorBlob", "TokenEvent",
    "UnexpectedMessageTypeError", "UnknownMessageTypeError", "WORKER_STATES", "WorkerState",
    "decode", "encode", "from_blob", "register", "subjects", "to_blob",
]
