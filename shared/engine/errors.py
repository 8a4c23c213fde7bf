"""Typed engine errors. Services turn these into coded replies (HTTP 4xx, bus error messages)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "engine_error"


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameters, token ids out of vocab, bad image).

    `param` names the offending field when there is one, as OpenAI's error format does.
    """

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class OutOfBlocksError(EngineError):
    """The KV cache cannot hold this request even when it runs alone."""

    code = "out_of_kv_blocks"


class UnknownRequestError(EngineError, KeyError):
    code = "unknown_request"
