"""OpenAI-shaped request bodies: every parameter is honoured or refused, none is ignored.

The parameters of OpenAI's chat and completions requests, and vLLM's documented extras, are
declared here. A parameter loraplex passes to vLLM is a field with its type; one it does not
serve is in :data:`REFUSED` and is a 400 ``unsupported_parameter`` naming it unless it holds
its no-op value; any other name is refused the same way (OpenAI does too). The bounds of the
sampling fields are checked once, by :class:`~server.engine.types.Sampling`, for both fronts.
The README's "OpenAI and vLLM parameters" table is this file, in prose.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, FailFast, Field, StrictBool, StrictInt, StrictStr, model_validator

from server.engine.types import MAX_LOGPROBS, Sampling, Structured
from server.errors import InvalidArgument, UnsupportedParameter

_WHY_BEAM = "beam search is not offered (vLLM serves it outside its OpenAI sampling path)"
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    # name: (values that change nothing and are accepted, why the rest are refused)
    "suffix": ((None,), "fill-in-the-middle needs a model that renders it; vLLM refuses it for these bases too"),
    "prompt_embeds": ((None,), "tenants may not send embeddings"),
    "use_beam_search": ((False,), _WHY_BEAM),
    "length_penalty": ((1.0, 1), _WHY_BEAM),
    "early_stopping": ((False,), _WHY_BEAM),
    "priority": ((0,), "requests are scheduled first come, first served (vLLM's fcfs policy)"),
    "session_id": ((None,), "sessions are not kept"),
    "watermarking": ((None, False), "watermarking is not enabled"),
    "prompt_logprobs": ((None,), "prompt logprobs are not returned"),
    "logprob_token_ids": ((None, []), "logprobs of chosen token ids are not returned"),
    "return_tokens_as_token_ids": ((None, False), "logprob tokens are returned as text"),
    "return_token_offsets": ((None, False), "token offsets are not returned"),
    "return_prompt_text": ((None, False), "the rendered prompt is not returned"),
    "return_mm_kwargs": ((None, False), "there is no multimodal input"),
    "mm_payload": ((None,), "there is no multimodal input"),
    "mm_processor_kwargs": ((None,), "there is no multimodal input"),
    "media_io_kwargs": ((None,), "there is no multimodal input"),
    "kv_transfer_params": ((None,), "disaggregated prefill is not offered"),
    "ec_transfer_params": ((None,), "disaggregated prefill is not offered"),
    "vllm_xargs": ((None,), "custom logits processors are not loaded"),
    "repetition_detection": ((None,), "not offered"),
    "stream_interval": ((None, 1), "every delta is streamed as it comes"),
    "thinking_token_budget": ((None,), "no reasoning parser is configured"),
    "reasoning_effort": ((None,), "no reasoning parser is configured"),
    "include_reasoning": ((True,), "no reasoning parser is configured"),
    "routed_experts_prompt_start": ((0,), "not offered"),
    "chat_template": ((None,), "a request may not bring its own template: the base's is used"),
    "truncation_side": ((None, "left"), "prompts are truncated from the left, as vLLM's default"),
    "functions": ((None,), "deprecated by OpenAI: send tools"),
    "function_call": ((None,), "deprecated by OpenAI: send tool_choice"),
    "audio": ((None,), "there is no audio output"),
    "modalities": ((None, ["text"]), "only text is generated"),
    "prediction": ((None,), "predicted outputs are not offered"),
    "web_search_options": ((None,), "web search is not offered"),
    "verbosity": ((None,), "not offered"),
    "prompt_cache_key": ((None,), "prefix caching is keyed by content (see cache_salt)"),
    "store": ((None, False), "completions are not stored"),
    "metadata": ((None, {}), "completions are not stored"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "logit_bias_type": ((None,), "not offered"),
}


class _FailFast(FailFast):
    __hash__ = object.__hash__  # typing hashes Annotated metadata when it builds unions


T = TypeVar("T")
List = Annotated[list[T], _FailFast()]
"""A list that stops at its first bad item: a million wrong items are one error, not a million
(pydantic builds each error while it holds the GIL: 1.5 s for a million, on every tenant's loop)."""

MAX_EXTRA_KEYS = 16
"""Keys an object may have beyond its fields and the REFUSED names, before it is refused whole."""


def _bound_keys(cls, data: Any) -> None:
    """An object with far more keys than its model has fields is refused with one error, naming the
    first key it does not know; otherwise each unknown key would cost an error of its own."""
    if isinstance(data, dict) and len(data) > len(cls.model_fields) + len(REFUSED) + MAX_EXTRA_KEYS:
        known = {f.alias or name for name, f in cls.model_fields.items()} | set(REFUSED)
        key = next(k for k in data if k not in known)
        raise UnsupportedParameter(f"{key} is not a parameter loraplex supports (an object of {len(data)} keys)",
                                   field=key)


def _refuse_unsupported(data: Any) -> Any:
    if isinstance(data, dict):
        for name, (accepted, why) in REFUSED.items():
            if name in data:
                if data[name] not in accepted:
                    raise UnsupportedParameter(f"{name} is not supported: {why}", field=name)
                data = {k: v for k, v in data.items() if k != name}
    return data


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        _bound_keys(cls, data)
        return _refuse_unsupported(data)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False
    """vLLM: usage in every chunk, not only the last."""


class JsonSchema(_Body):
    name: StrictStr = "schema"
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data):
        if isinstance(data, dict) and data.get("type") == "structural_tag":
            raise UnsupportedParameter("response_format of type structural_tag is not supported",
                                       field="response_format")
        return data


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: one constraint."""

    json_: dict | str | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: List[StrictStr] | None = None
    json_object: StrictBool | None = None
    disable_any_whitespace: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _kinds(cls, data):
        if isinstance(data, dict):
            for name, why in (("grammar", "EBNF grammars are not compiled for tenants"),
                              ("structural_tag", "structural tags are not offered"),
                              ("whitespace_pattern", "not offered"),
                              ("disable_additional_properties", "not offered")):
                if data.get(name) not in (None, False):
                    raise UnsupportedParameter(f"structured_outputs.{name} is not supported: {why}",
                                               field=f"structured_outputs.{name}")
                data = {k: v for k, v in data.items() if k != name}
        return data


class _Sampling(_Body):
    """What completions and chat share: vLLM's ``SamplingParams`` under OpenAI's names."""

    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt = 1
    stop: StrictStr | List[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, max_length=256)
    """Recorded in the server's log line for the request (OpenAI: for abuse monitoring)."""
    safety_identifier: StrictStr | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: List[StrictInt] | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    allowed_token_ids: List[StrictInt] | None = None
    bad_words: List[StrictStr] | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    structured_outputs: StructuredOutputs | None = None
    return_token_ids: StrictBool | None = False
    cache_salt: StrictStr | None = Field(None, min_length=1, max_length=256)
    request_id: StrictStr | None = None
    echo: StrictBool = False

    def sampling(self, *, max_tokens: int | None, logprobs: int | None) -> Sampling:
        return Sampling(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, n=self.n,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()), seed=self.seed, logprobs=logprobs,
            logit_bias=_logit_bias(self.logit_bias), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None,
            bad_words=tuple(self.bad_words or ()), structured=self.structured())

    def structured(self) -> Structured | None:
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type != "text" and so is not None:
            raise InvalidArgument("send response_format or structured_outputs, not both", field="structured_outputs")
        if rf is not None and rf.type == "json_object":
            return Structured("json_object")
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidArgument("a json_schema response_format needs json_schema.schema",
                                      field="response_format.json_schema")
            return Structured("json", rf.json_schema.schema_)
        if so is None:
            return None
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("json_object", so.json_object)) if v is not None}
        if len(given) != 1:
            raise InvalidArgument("structured_outputs takes exactly one of json, regex, choice, json_object",
                                  field="structured_outputs")
        kind, value = next(iter(given.items()))
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidArgument("structured_outputs.json is not a JSON schema", field="structured_outputs.json") \
                    from None
        return Structured(kind, None if kind == "json_object" else value, compact=so.disable_any_whitespace)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for k, v in (bias or {}).items():
        try:
            out.append((int(k), float(v)))
        except ValueError:
            raise InvalidArgument(f"logit_bias keys are token ids; got {k!r}", field="logit_bias") from None
    return tuple(out)


# ---------------------------------------------------------------- completions


class CompletionRequest(_Sampling):
    prompt: StrictStr | List[StrictStr] | List[StrictInt] | List[List[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's (and vLLM's) default for completions
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    add_special_tokens: StrictBool = True  # vLLM's completions default: the tokenizer's BOS

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of other than n is not supported (vLLM's V1 engine does not offer it)",
                                       field="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidArgument("the prompt is empty", field="prompt")
        if self.echo and self.logprobs is not None:
            raise UnsupportedParameter("echo with logprobs is not supported (it needs prompt logprobs)", field="echo")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", field="logprobs")
        return self

    def prompts(self) -> tuple[list, bool]:
        """The prompts, as texts or token-id lists, and whether they are token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p], False
        if all(isinstance(x, int) for x in p):
            return [list(p)], True
        if all(isinstance(x, str) for x in p):
            return list(p), False
        if all(isinstance(x, list) for x in p):
            return [list(x) for x in p], True
        raise InvalidArgument("prompt is a string, a list of strings, a list of token ids or a list of lists of "
                              "token ids", field="prompt")


# ---------------------------------------------------------------- chat


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr


class ToolCallParam(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | List[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: List[ToolCallParam] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _parts(cls, data):
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", None):
                    raise UnsupportedParameter(f"content parts of type {kind!r} are not supported: the base is a "
                                               "text model", field="messages.content")
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise InvalidArgument("a tool message needs tool_call_id", field="tool_call_id")
        if self.content is None and not self.tool_calls and self.role != "assistant":
            raise InvalidArgument(f"a {self.role} message needs content", field="content")
        return self

    def for_template(self) -> dict:
        """The message as chat templates take it (vLLM's rendering): text parts joined by newlines,
        no content as "", tool-call arguments as objects."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        elif content is None:
            content = ""
        out: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if (v := getattr(self, key)) is not None:
                out[key] = v
        if self.tool_calls:
            out["tool_calls"] = [{"id": tc.id, "type": "function", "function": {
                "name": tc.function.name, "arguments": _arguments(tc.function.arguments)}} for tc in self.tool_calls]
        return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidArgument("tool call arguments must be a JSON object", field="messages.tool_calls") from None


class FunctionDefinition(_Body):
    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    """Deprecated by OpenAI for max_completion_tokens, which wins when both are given (as in vLLM)."""
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: List[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False  # the template has its own
    chat_template_kwargs: dict[str, Any] | None = None
    documents: List[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                                  field="top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs")
        return self

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def choice(self):
        tc = self.tool_choice
        return tc.model_dump() if isinstance(tc, NamedToolChoice) else tc


# ---------------------------------------------------------------- tokenize


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the base's template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: List[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False
    tools: List[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidArgument("send prompt or messages (one of them)", field="prompt")
        return self


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: List[StrictInt]


# ---------------------------------------------------------------- vLLM's adapter endpoints


class LoadLoraRequest(_Body):
    lora_name: StrictStr = Field(min_length=1)
    lora_path: StrictStr = Field(min_length=1)
    tenant: StrictStr | None = None
    load_inplace: StrictBool = False


class UnloadLoraRequest(_Body):
    lora_name: StrictStr = Field(min_length=1)
    lora_int_id: StrictInt | None = None
    tenant: StrictStr | None = None
