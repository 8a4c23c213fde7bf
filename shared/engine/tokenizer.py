"""The model's tokenizer and chat template, loaded from a local HuggingFace folder only.

Wraps `transformers.PreTrainedTokenizerFast` (so chat templates render exactly as
transformers renders them, in its jinja2 sandbox) and sends encode / decode straight to the
fast `tokenizers` backend. Never touches the network.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.engine.errors import InvalidRequestError

# A template that inspects content parts itself (rather than printing message['content']).
_PARTS_AWARE = re.compile(
    r"content'?\]?\s*(\|\s*\w+\s*)?is\s+(not\s+)?(string|iterable|sequence|mapping)"
    r"|\[\s*['\"]type['\"]\s*\]|\.type\b|['\"]type['\"]\s*,|for\s+\w+\s+in\s+\w+(\[['\"]content"
    r"['\"]\]|\.content)")
_IMAGE_PART_TYPES = ("image", "image_url")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Encode / decode / chat template of one model. Immutable after construction; safe to
    share between threads (the backend releases the GIL and holds no per-call state)."""

    def __init__(self, hf, *, extra_eos_token_ids: Sequence[int] = (),
                 image_token: str | None = None, image_token_id: int | None = None):
        self.hf = hf  # the transformers tokenizer (reference behaviour, chat templates)
        self._backend = hf.backend_tokenizer  # tokenizers.Tokenizer (hot paths)
        self._hf_decode = bool(getattr(hf, "clean_up_tokenization_spaces", False))
        self.vocab_size: int = len(hf)  # every valid id, added tokens included
        self.bos_token_id: int | None = hf.bos_token_id
        self.pad_token_id: int | None = hf.pad_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(
            _ids(hf.eos_token_id) + [int(t) for t in extra_eos_token_ids]))
        if image_token is None and image_token_id is not None:
            image_token = self._backend.id_to_token(image_token_id)
        if image_token is not None and image_token_id is None:
            image_token_id = self._backend.token_to_id(image_token)
        self.image_token: str | None = image_token
        self.image_token_id: int | None = image_token_id

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (chat template from there or from
        chat_template.jinja / chat_template.json); eos ids also from generation_config.json
        and config.json; image token from tokenizer / processor / model config.
        Raises FileNotFoundError when the folder or its tokenizer.json is missing."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder} (only fast tokenizers are "
                                    "supported; convert the model's tokenizer first)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        if not hf.chat_template:
            if (folder / "chat_template.jinja").is_file():
                hf.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
            elif _read_json(folder / "chat_template.json").get("chat_template"):
                hf.chat_template = _read_json(folder / "chat_template.json")["chat_template"]
        config = _read_json(folder / "config.json")
        text_config = config.get("text_config") or {}
        eos = (_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
               + _ids(config.get("eos_token_id")) + _ids(text_config.get("eos_token_id")))
        image_token = getattr(hf, "image_token", None)
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        for cfg in (tok_cfg, _read_json(folder / "processor_config.json"),
                    _read_json(folder / "preprocessor_config.json")):
            image_token = image_token or cfg.get("image_token")
        image_id = config.get("image_token_index", config.get("image_token_id"))
        if image_token is not None and hf.backend_tokenizer.token_to_id(image_token) is None:
            image_token = None
        return cls(hf, extra_eos_token_ids=eos, image_token=image_token,
                   image_token_id=None if image_token else image_id)

    # --- ids <-> text ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._hf_decode:  # transformers' clean-up of tokenization spaces (WordPiece models)
            return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    # --- chat --------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | dict | None:
        return self.hf.chat_template

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render `messages` as transformers does (`tokenize=False`); `kwargs` become template
        variables. Content may be a string or a list of {"type": "text", "text": ...} /
        {"type": "image"} parts; for templates that only print string content, the parts are
        joined with newlines and images become `image_token`. Raises InvalidRequestError when
        the model has no chat template or the template rejects the conversation."""
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template; use the completions "
                                      "API with a raw prompt", param="messages")
        if not self._template_takes_parts(kwargs.get("chat_template")):
            messages = [self._flatten(m) for m in messages]
        import jinja2

        try:
            return self.hf.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt,
                tokenize=False, **kwargs)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **kwargs: Any) -> list[int]:
        """`apply_chat_template` then `encode` without added special tokens (as transformers
        tokenizes chat prompts: the template writes any BOS itself)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _template_takes_parts(self, override: str | None) -> bool:
        template = override or self.hf.chat_template
        if isinstance(template, dict):
            template = "\n".join(template.values())
        return bool(_PARTS_AWARE.search(template or ""))

    def _flatten(self, message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind in _IMAGE_PART_TYPES and self.image_token is not None:
                texts.append(self.image_token)
            elif kind in _IMAGE_PART_TYPES:
                raise InvalidRequestError("this model does not accept images", param="messages")
            else:
                raise InvalidRequestError(f"unsupported content part type {kind!r}",
                                          param="messages")
        return {**message, "content": "\n".join(texts)}
