"""Every message that crosses the bus, one frozen dataclass each.

Construct with keywords only. A field with a default may be left out on the wire (see
codec.py for the compatibility rule). Token ids are ints, hashes are lowercase hex str,
times are unix seconds (float), sampling parameters travel as `SamplingParams.to_dict()`.

Request life, by message:

    gateway --EncodeWork-->  epd.work.encode.<prio>   --(E)--> PrefillWork (mm filled in)
    gateway --PrefillWork--> epd.work.prefill.<prio>  --(P)--> DecodeWork (+ KVHandle)
            (P)(D) --TokenEvent / ErrorEvent--> reply subject (epd.tokens.<request>)
    decode  --KVFetchRequest--> epd.kv.fetch.<holder> --KVFetchReply--> decode
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from shared.protocol.codec import Message, register
from shared.protocol.tensors import TensorBlob

Role = Literal["encode", "prefill", "decode", "mixed"]
WorkerState = Literal["starting", "ready", "draining", "switching", "stopping"]
PriorityName = Literal["online", "offline"]
KVEventKind = Literal["stored", "removed", "cleared"]
KVTier = Literal["device", "host", "disk"]
ROLES: tuple[str, ...] = get_args(Role)
WORKER_STATES: tuple[str, ...] = get_args(WorkerState)


# --- control ----------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Worker -> scheduler (and kvcache) on epd.ctl.heartbeat, every few seconds.

    `seq` grows by one per heartbeat of one process (pid); a receiver drops older ones.
    `capacity` is how many more requests the worker would pull right now.
    """

    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str
    role: Role
    state: WorkerState
    seq: int
    ts: float
    model: str = ""
    device: str = ""
    pid: int = 0
    host: str = ""
    queue_depth: int = 0
    running: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    step_time_ms: float = 0.0
    tokens_per_s: float = 0.0
    capacity: int = 0


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RoleCommand(Message):
    """Scheduler -> one worker on epd.ctl.role.<worker>: switch to `role`.

    A worker applies a command only if `epoch` is higher than the last one it applied.
    """

    TYPE: ClassVar[str] = "role_command"
    worker_id: str
    role: Role
    epoch: int
    reason: str = ""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest(Message):
    """Gateway -> every worker on epd.ctl.cancel.<request>: stop work on it, free its blocks."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str
    reason: str = ""


# --- multimodal -------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRef(Message):
    """One image of a request, named by the hex hash of its content (the embedding cache key).

    Carries the encoded image file (`data`), or pixels already preprocessed by the gateway,
    or neither when the encoder is expected to have the embedding cached.
    """

    TYPE: ClassVar[str] = "image_ref"
    hash: str
    num_tokens: int
    data: bytes | None = None
    pixels: TensorBlob | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureRef(Message):
    """Where an embedding too large to inline lives: pull `key` from `worker_id` (epd.xfer)."""

    TYPE: ClassVar[str] = "feature_ref"
    worker_id: str
    key: str
    nbytes: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class MMFeatures(Message):
    """Embeddings of one image, inline (`features`, [num_tokens, hidden]) or by `location`."""

    TYPE: ClassVar[str] = "mm_features"
    image_hash: str
    features: TensorBlob | None = None
    location: FeatureRef | None = None


# --- work queues ------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillWork(Message):
    """Gateway or encoder -> prefill workers on epd.work.prefill.<priority>.

    `mm` holds one entry per image, in the order of the image placeholders in the prompt.
    `attempt` counts re-drives after failures; `reply` is the subject for token events.
    """

    TYPE: ClassVar[str] = "prefill_work"
    request_id: str
    prompt_token_ids: list[int]
    params: dict
    model: str
    reply: str
    arrival_ts: float
    priority: PriorityName = "online"
    deadline_ts: float | None = None
    mm: list[MMFeatures] = field(default_factory=list)
    attempt: int = 0


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class EncodeWork(Message):
    """Gateway -> encode workers on epd.work.encode.<priority>.

    After encoding `images`, the encoder publishes `prefill` with its `mm` filled in.
    """

    TYPE: ClassVar[str] = "encode_work"
    request_id: str
    images: list[ImageRef]
    prefill: PrefillWork


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KVHandle(Message):
    """Names the KV blocks a prefill worker holds pinned for one request.

    Block i covers prompt tokens [i*block_size, (i+1)*block_size); `block_hashes` are the
    chained prefix hashes, so any worker or tier holding a hash can serve that block.
    """

    TYPE: ClassVar[str] = "kv_handle"
    worker_id: str
    request_id: str
    block_ids: list[int]
    block_hashes: list[str]
    num_tokens: int
    block_size: int
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeWork(Message):
    """Prefill worker -> decode workers on epd.work.decode.<priority>.

    `first_token_ids` has one token per sample (n > 1); with `kv` None (or unreachable)
    the decode worker recomputes the prefill, using `mm` for image prompts.
    """

    TYPE: ClassVar[str] = "decode_work"
    request_id: str
    prompt_token_ids: list[int]
    params: dict
    first_token_ids: list[int]
    model: str
    reply: str
    arrival_ts: float
    kv: KVHandle | None = None
    priority: PriorityName = "online"
    deadline_ts: float | None = None
    attempt: int = 0
    first_logprobs: list[dict] | None = None
    mm: list[MMFeatures] = field(default_factory=list)


# --- results ----------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEvent(Message):
    """Prefill/decode worker -> gateway on the request's reply subject: new tokens only.

    `index` is the output position of token_ids[0] within sample `seq_index`, so the gateway
    drops duplicates and detects gaps. A set `finish_reason` ends that sample.
    """

    TYPE: ClassVar[str] = "token"
    request_id: str
    index: int
    token_ids: list[int]
    seq_index: int = 0
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    worker_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorEvent(Message):
    """Any worker -> gateway on the reply subject: the request failed (ends the stream).

    `code`/`param` map onto OpenAI's error object; `retryable` says a re-drive may succeed.
    """

    TYPE: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str
    param: str | None = None
    retryable: bool = False
    worker_id: str = ""


# --- KV cache ---------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KVEvent(Message):
    """Worker -> kvcache service on epd.kv.events: blocks stored in or removed from a tier."""

    TYPE: ClassVar[str] = "kv_event"
    worker_id: str
    kind: KVEventKind
    block_hashes: list[str]
    tier: KVTier = "device"


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KVFetchRequest(Message):
    """Decode worker -> holder on epd.kv.fetch.<holder> (request/reply), one chunk per call.

    The holder answers chunk `chunk_index` of `block_ids`, at most `max_bytes` per reply
    (0: holder's default).
    """

    TYPE: ClassVar[str] = "kv_fetch"
    request_id: str
    worker_id: str
    block_ids: list[int]
    chunk_index: int = 0
    max_bytes: int = 0


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KVFetchReply(Message):
    """Holder -> decode worker: `blocks[i]` is the KV data of block `block_ids[i]`.

    `last` marks the final chunk; `error` set means the holder cannot serve the request.
    """

    TYPE: ClassVar[str] = "kv_fetch_reply"
    request_id: str
    chunk_index: int
    last: bool
    blocks: list[TensorBlob] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    error: str | None = None


# --- chunked transfer -------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRequest(Message):
    """Puller -> holder on epd.xfer.<holder>: send chunk `index` of transfer `transfer_id`."""

    TYPE: ClassVar[str] = "chunk_request"
    transfer_id: str
    index: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Message):
    """Holder -> puller: chunk `index` of `total`; `sha256` (hex) covers the whole payload.

    `error` set (unknown or expired transfer) means no data follows.
    """

    TYPE: ClassVar[str] = "chunk"
    transfer_id: str
    index: int
    total: int = 0
    total_bytes: int = 0
    sha256: str = ""
    data: bytes = b""
    error: str | None = None
