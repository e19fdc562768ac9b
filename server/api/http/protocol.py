"""OpenAI-shaped request bodies (the subset loraplex serves), validated by pydantic.

Unknown fields are ignored, as OpenAI does; wrong types are 400s naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.types import Sampling


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    """None: whatever the context leaves after the prompt (chat's default, as in vLLM)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions: keep generating past EOS (benchmarks); return the
    # generated token ids with each choice (exact comparisons).
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self, logprobs: int | None) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, n=self.n,
                        stop=stop, seed=self.seed, logprobs=logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's (and vLLM's) default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        # Accept [{"type": "text", "text": ...}] content parts (text only).
        if isinstance(v, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(p["text"] for p in v)
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    def sampling(self, logprobs=None) -> Sampling:
        s = super().sampling(self.top_logprobs or 0 if self.logprobs else None)
        if self.max_completion_tokens is not None and self.max_tokens is None:
            s = Sampling(**{**s.__dict__, "max_tokens": self.max_completion_tokens})
        return s


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    tenant: str | None = None


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    tenant: str | None = None
