"""Per-request sampling parameters: frozen, validated once, carried as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from shared.engine.errors import InvalidRequestError

_MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how. Invalid values raise InvalidRequestError naming the field.

    temperature == 0 means greedy. `seed` makes sampling reproducible per (seed, sequence
    index, token index) regardless of batch composition; when None the engine draws one at
    admission and keeps it with the request so a re-run after a failure repeats itself.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        # Accept lists from JSON / msgpack and freeze them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise InvalidRequestError(f"{name} {msg}", param=name)

        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            bad("n", f"must be an integer in [1, 128], got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty!r}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be at most 16 non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= _MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {_MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "requires logprobs to be true")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in d.items() if k in known})
