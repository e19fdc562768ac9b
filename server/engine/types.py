"""Engine-neutral request/response types, so nothing outside engine/ imports vllm.

:class:`Sampling` is where a request's sampling parameters are checked, once, for both fronts:
each bound is vLLM's own (``SamplingParams``) or, where OpenAI's is tighter, OpenAI's, and a
value outside it is an :class:`~server.errors.InvalidArgument` naming the field. ``None`` means
"not given": the service fills it from the base's ``generation_config.json`` as ``vllm serve``
does, else OpenAI's default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

from server.errors import InvalidArgument, require

MAX_LOGPROBS = 20
"""vLLM's default ``max_logprobs``, and OpenAI's ``top_logprobs`` limit."""
MAX_N = 128
MAX_STOP = 64
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 1024
MAX_SCHEMA_BYTES = 64 << 10
"""A response_format schema, a tool's parameters, a regex: tenants' grammars are compiled by
the engine, so their size is bounded."""


@dataclass(frozen=True)
class Structured:
    """A constraint on the output, compiled by vLLM's structured-output backend."""

    kind: Literal["json", "json_object", "regex", "choice"]
    value: object = None
    """json: the JSON schema (a dict); regex: the pattern; choice: the list of strings."""
    compact: bool = False
    """JSON without whitespace between tokens (vLLM's disable_any_whitespace)."""

    def __post_init__(self) -> None:
        size = len(json.dumps(self.value)) if self.value is not None else 0
        if size > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"the {self.kind} constraint is {size} bytes; at most {MAX_SCHEMA_BYTES} are "
                                  "accepted", field="response_format")


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    """None: what the context leaves after the prompt."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """0 or -1: off."""
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """Top-k logprobs per sampled token (0: only the sampled token's); None: none."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    structured: Structured | None = None

    def __post_init__(self) -> None:
        require("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "at least 1", self.max_tokens)
        for name, lo, hi, open_lo in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                      ("min_p", 0.0, 1.0, False), ("presence_penalty", -2.0, 2.0, False),
                                      ("frequency_penalty", -2.0, 2.0, False),
                                      ("repetition_penalty", 0.0, 2.0, True)):
            v = getattr(self, name)
            if v is not None:
                require(name, _real(v) and (lo < v if open_lo else lo <= v) and v <= hi,
                       f"between {lo:g} and {hi:g}" + (f" (above {lo:g})" if open_lo else ""), v)
        require("top_k", self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= -1),
               "-1, 0 (both: off) or a positive integer", self.top_k)
        require("n", isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"between 1 and {MAX_N}", self.n)
        require("stop", len(self.stop) <= MAX_STOP and all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"at most {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} characters", self.stop)
        require("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
               f"between 0 and {MAX_LOGPROBS} (vLLM's max_logprobs)", self.logprobs)
        require("logit_bias", len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
            _real(b) and -100 <= b <= 100 for _, b in self.logit_bias),
            f"at most {MAX_LOGIT_BIAS} token ids, each with a bias between -100 and 100", dict(self.logit_bias))
        require("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0
               and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
               "between 0 and max_tokens", self.min_tokens)
        require("allowed_token_ids", self.allowed_token_ids is None or 0 < len(self.allowed_token_ids),
               "a non-empty list of token ids", self.allowed_token_ids)
        require("bad_words", len(self.bad_words) <= MAX_STOP
               and all(0 < len(w) <= MAX_STOP_CHARS for w in self.bad_words),
               f"at most {MAX_STOP} non-empty words", self.bad_words)
        require("seed", self.seed is None or -(2**63) <= self.seed < 2**63, "a 64-bit integer", self.seed)

    def token_ids(self) -> dict[str, tuple[int, ...]]:
        """Every token id the request names, by field, for the service's vocabulary check."""
        return {"stop_token_ids": self.stop_token_ids, "logit_bias": tuple(t for t, _ in self.logit_bias),
                "allowed_token_ids": self.allowed_token_ids or ()}


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    """The step's candidates in vLLM's order (the sampled token first, then by rank)."""
    token_id: int | None = None


@dataclass
class Completion:
    """One choice's *delta* since the previous Completion for that index."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """The stop string or token id that ended the choice (vLLM's), when one did."""
    logprobs: list[TokenLogprob] | None = None
