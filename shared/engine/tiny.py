"""Tiny random-weight models (llama, qwen2, llava) saved as HuggingFace folders.

`make_tiny(arch, out_dir, seed=...)` builds a model with `transformers` from a small config,
a byte-level BPE tokenizer trained offline on a built-in corpus (vocab = the model's vocab),
a ChatML chat template and, for llava, a PIL-backed CLIP image processor + LlavaProcessor.
The folder loads offline with transformers (the reference) and with our engine. The same
(arch, seed, overrides) gives the same files; `initializer_range=0.2` keeps the top-2 logit
gap wide so greedy comparisons against transformers are not flaky.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from shared.engine.modelfiles import build_folder, save_tokenizer

TINY_ARCHS = ("llama", "qwen2", "llava")
FORMAT_VERSION = 1

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2; <image> is 3

TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,
}
VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "initializer_range": 0.2,
}

# ChatML; string content or a list of parts ({"type": "text", "text": ...} / {"type": "image"}).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}IMAGE_PART"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def chat_template(arch: str) -> str:
    """The ChatML template of a tiny `arch`; image parts render `<image>` (llava) or raise."""
    image = "{{- '<image>' -}}"
    if arch != "llava":
        image = "{{- raise_exception('this model does not accept images') -}}"
    return _CHAT_TEMPLATE.replace("IMAGE_PART", image)


def make_tiny(arch: str, out_dir: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Build the tiny `arch` model folder at `out_dir` and return it.

    `overrides` update the text config (TEXT_DEFAULTS keys or any config field); for llava
    `vision_config={...}` updates VISION_DEFAULTS. A no-op when `out_dir` already holds the
    same (arch, seed, overrides) build; raises ValueError for an unknown arch. The tokenizer
    has exactly `vocab_size` tokens up to ~1000 (the corpus runs out of merges beyond that;
    the model then has unused ids, as real checkpoints often do).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch: expected one of {TINY_ARCHS}, got {arch!r}")
    if "vision_config" in overrides and arch != "llava":
        raise ValueError(f"vision_config: {arch} has no vision tower")
    marker = {
        "kind": "tiny",
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "seed": seed,
        "overrides": json.loads(json.dumps(overrides, sort_keys=True)),
    }
    return build_folder(Path(out_dir), marker, lambda tmp: _build(arch, tmp, seed, overrides))


def make_tiny_cli(arch: str, out: str | Path, seed: int = 0) -> Path:
    """CLI entry (`epd model make-tiny --arch --out --seed`): same as make_tiny, no overrides."""
    return make_tiny(arch, Path(out), seed=seed)


def _build(arch: str, out: Path, seed: int, overrides: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig

    overrides = dict(overrides)
    vision_overrides = overrides.pop("vision_config", None) or {}
    text_kwargs = {**TEXT_DEFAULTS, **overrides}
    specials = [*SPECIAL_TOKENS, IMAGE_TOKEN] if arch == "llava" else list(SPECIAL_TOKENS)
    tokenizer = _make_tokenizer(
        text_kwargs["vocab_size"],
        specials,
        chat_template(arch),
        text_kwargs["max_position_embeddings"],
    )
    eos_id, im_end_id = tokenizer.convert_tokens_to_ids([EOS_TOKEN, "<|im_end|>"])
    ids = {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id}
    stop_ids = text_kwargs.get("eos_token_id", [eos_id, im_end_id])  # generation_config's
    ids.update({k: text_kwargs.pop(k) for k in list(ids) if k in text_kwargs})

    config = _config(arch, text_kwargs, {**VISION_DEFAULTS, **vision_overrides}, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(arch)(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids, pad_token_id=ids["pad_token_id"]
    )
    with _quiet_progress():
        model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    if arch == "llava":
        processor = _make_processor(config, tokenizer)
        processor.save_pretrained(out)  # processor_config.json (holds the image processor too)
        processor.image_processor.save_pretrained(out)  # preprocessor_config.json, classic layout
        save_tokenizer(tokenizer, out)  # the processor rewrote tokenizer_config.json


@contextlib.contextmanager
def _quiet_progress():
    """Silence transformers' "Writing model shards" bar, restoring the caller's setting."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _config(arch: str, text: dict, vision: dict, ids: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

    if arch == "qwen2":
        kw = {"tie_word_embeddings": True, **text, **ids}
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], dtype="float32", **kw)
    llama = LlamaConfig(architectures=["LlamaForCausalLM"], dtype="float32", **text, **ids)
    if arch == "llama":
        return llama
    return LlavaConfig(
        architectures=["LlavaForConditionalGeneration"],
        vision_config=CLIPVisionConfig(**vision),
        text_config=llama,
        image_token_index=len(SPECIAL_TOKENS),  # <image> follows the ChatML specials
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        dtype="float32",
        **ids,
    )


def _model_class(arch: str):
    import transformers

    name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        arch, "LlavaForConditionalGeneration"
    )
    return getattr(transformers, name)


def _make_processor(config, tokenizer):
    """LlavaProcessor over the PIL CLIP image processor (needs no torchvision).

    One `<image>` expands to (image_size // patch_size)**2 placeholders: the CLS token is
    counted by `num_additional_image_tokens=1` and dropped by the "default" strategy,
    exactly as the model drops it from the vision features.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = config.vision_config
    side = vision.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )


def _make_tokenizer(vocab_size: int, specials: list[str], template: str, max_length: int):
    """Byte-level BPE trained on `_CORPUS`; special tokens take ids 0..len(specials)-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} is too small for {tok.get_vocab_size()} tokens")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        additional_special_tokens=specials[1:],
        chat_template=template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


_CORPUS = """\
The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Where there is \
smoke, there is fire; where there is a will, there is a way. It was the best of times, it \
was the worst of times, it was the age of wisdom, it was the age of foolishness.

Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. \
Every morning he took his boat out before sunrise, and every evening he came home with a \
basket of fish. "What did you catch today?" she asked. "Three cod, two mackerel and a \
story," he answered, and they laughed together by the fire.

The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome. \
Berlin is the capital of Germany, Madrid is the capital of Spain, and Ottawa is the capital \
of Canada. London, New York, Sydney and Cairo are large cities with long histories.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 64 99 100 128 256 512 \
1000 1024 2048 4096 65536 3.14159 2.71828 1/2 3/4 -7 +42 1e-6 10% 99.9% $5.00 12:30 \
2024-01-31 #1 (a) [b] {c} <d> "e" 'f' a+b=c x*y/z 2^10 ~ | \\ @home & co; end.

Q: What is two plus two? A: Two plus two is four. Q: How many days are in a week? A: There \
are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. \
Q: What color is the sky? A: On a clear day the sky is blue; at sunset it turns orange and red.

def add(a, b):
    return a + b

for i in range(10):
    print(f"value {i}: {add(i, i * 2)}")

if __name__ == "__main__":
    main()

Science tells us that water boils at 100 degrees Celsius at sea level and freezes at zero. \
Light travels at about 300,000 kilometres per second. The Earth orbits the Sun once a year, \
and the Moon orbits the Earth about once a month. Plants turn sunlight, water and carbon \
dioxide into sugar and oxygen.

User: Can you help me write an email to my team? Assistant: Of course! Here is a short draft. \
"Hi everyone, thanks for your hard work this week. Let's meet on Friday at 10am to review \
the results and plan the next steps. Best regards, Sam." Would you like me to change anything?

A picture is worth a thousand words. This image shows a red square, a green circle and a \
blue triangle on a white background. The cat sat on the mat; the dog slept under the table. \
Describe the image in one sentence. What do you see in this photo? I see two birds in a tree.

Good morning! How are you? I'm fine, thank you. Please, sorry, yes, no, maybe, hello, \
goodbye. It's, don't, can't, won't, I'll, we're, they've, she'd. ALL CAPS, Title Case, \
lower case, snake_case, camelCase, kebab-case, http://example.com/path?q=1&r=2.
"""
