"""Engine configuration: one frozen dataclass, validated in `__post_init__`.

Field metadata carries CLI help so `shared.config.add_arguments(parser, EngineConfig)` gives
the same names on the command line and in `EPD_*` env vars. Values that depend on the model
(max_model_len default, number of KV blocks) are resolved by the engine with the helpers below.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import opt as _opt
from shared.config import require as _require

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_QUANTS = ("none", "int8")
_DEVICE_KINDS = ("cpu", "cuda", "npu")
DEFAULT_MAX_MODEL_LEN_CAP = 8192


@dataclass(frozen=True)
class EngineConfig:
    model: str = _opt("", "path of a local HuggingFace model folder")
    dtype: str = _opt("float32", "weights / activations / KV cache dtype", DTYPES)
    device: str = _opt("cpu", "cpu, cuda, cuda:N, npu or npu:N")
    block_size: int = _opt(16, "tokens per KV cache block")
    num_kv_blocks: int | None = _opt(None, "KV cache blocks (default: sized from kv_cache_gb)")
    kv_cache_gb: float = _opt(0.5, "KV cache size in GiB when num_kv_blocks is not given")
    max_num_seqs: int = _opt(128, "most sequences in one step")
    max_num_batched_tokens: int = _opt(2048, "token budget of one step")
    enable_chunked_prefill: bool = _opt(True, "split long prompts over several steps")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of identical prompt prefixes")
    max_model_len: int | None = _opt(None, "longest prompt + output (default: model's, capped at 8192)")
    num_threads: int | None = _opt(None, "torch intra-op threads (default: leave torch's)")
    seed: int = _opt(0, "seed of the engine RNG that draws per-request seeds")
    weight_quant: str = _opt("none", "weight-only quantization of the linear layers (int8: per-channel "
                             "scales, bf16 matmuls; changes numerics)", WEIGHT_QUANTS)
    max_images_per_request: int = _opt(16, "most images in one request (multimodal models)")
    mm_cache_gb: float = _opt(0.25, "image embedding LRU cache size in GiB (multimodal models)")

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and bool(self.model), "model", "must be a folder path")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        kind, _, idx = self.device.partition(":")
        _require(kind in _DEVICE_KINDS and (idx == "" or idx.isdigit()), "device",
                 f"must be cpu, cuda[:N] or npu[:N], got {self.device!r}")
        _require(kind != "cpu" or idx == "", "device", "cpu takes no index")
        _require(isinstance(self.block_size, int) and 1 <= self.block_size <= 1024, "block_size",
                 "must be an integer in [1, 1024]")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1")
        _require(self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        _require(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1")
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be a non-negative int")
        _require(self.weight_quant in WEIGHT_QUANTS, "weight_quant", f"must be one of {WEIGHT_QUANTS}")
        _require(isinstance(self.max_images_per_request, int) and self.max_images_per_request >= 0,
                 "max_images_per_request", "must be a non-negative int")
        _require(self.mm_cache_gb >= 0, "mm_cache_gb", "must be >= 0")

    @property
    def device_kind(self) -> str:
        return self.device.partition(":")[0]

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        """The context limit: explicit value (must not exceed the model's) or the model's, capped."""
        if self.max_model_len is None:
            return min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        _require(self.max_model_len <= max_position_embeddings, "max_model_len",
                 f"{self.max_model_len} exceeds the model's max_position_embeddings "
                 f"{max_position_embeddings}")
        return self.max_model_len

    def resolve_num_kv_blocks(self, bytes_per_block: int) -> int:
        """Explicit block count, else as many blocks as fit in `kv_cache_gb`."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return max(1, int(self.kv_cache_gb * (1 << 30)) // bytes_per_block)
