"""Prompts: the base tokenizer's chat template and vocabulary, and the base's sampling defaults.

Everything a tenant sends is bounded before it costs anything: a prompt longer than
``--max-prompt-chars`` (chat: the messages, tools, documents and template kwargs together) is
refused untokenized; long ones are tokenized, and every chat template rendered, in a worker thread; token ids must be in the vocabulary; a template that refuses a
conversation (roles out of order, say) is the client's 400, not the server's 500.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from pathlib import Path
from typing import Any

from server.errors import InvalidArgument, UnsupportedParameter

logger = logging.getLogger(__name__)

INLINE_CHARS = 4096
"""Prompts up to this size are tokenized on the event loop (tens of microseconds)."""
GENERATION_DEFAULTS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                       "min_p")
"""What ``vllm serve`` (``--generation-config auto``) takes from the base's generation_config.json
for a request that leaves it unset."""


class Prompts:
    def __init__(self, tokenizer, *, max_chars: int, max_model_len: int, model_dir: Path | None = None):
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.max_model_len = max_model_len
        self.defaults = generation_defaults(model_dir) if model_dir is not None else {}

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # ------------------------------------------------------------ text -> ids

    async def encode(self, text: str, *, field: str = "prompt", add_special_tokens: bool = False) -> list[int]:
        self.check_chars(len(text), field)
        return await _off_loop(self._encode, text, add_special_tokens, size=len(text))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    async def detokenize(self, ids: list[int], field: str = "tokens") -> str:
        """vLLM's /detokenize, bounded: at most a context of ids, each in the vocabulary, decoded off
        the event loop when there are many."""
        if len(ids) > self.max_model_len:
            raise InvalidArgument(f"{len(ids)} token ids; at most {self.max_model_len} (this model's context) are "
                                  "decoded at once", field=field)
        self.check_ids(ids, field)
        return await _off_loop(self.decode, ids, size=len(ids) * 4)

    async def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                          add_generation_prompt: bool = True, continue_final_message: bool = False,
                          documents: list[dict] | None = None, template_kwargs: dict | None = None,
                          add_special_tokens: bool = False, field: str = "messages") -> list[int]:
        """The base tokenizer's chat template -- the same rendering the trainer trained on. Always in a
        worker thread: what a template costs depends on all of its input (tools, documents, its
        kwargs), not only the messages, and a thread hop costs less than the smallest render."""
        self.check_chars(sum(_chars(m.get("content")) for m in messages), field)
        kwargs = dict(template_kwargs or {})
        for name in kwargs:
            if name in self._reserved_kwargs:
                raise InvalidArgument(f"chat_template_kwargs may not set {name!r} (the server sets it)",
                                      field="chat_template_kwargs")
        return await asyncio.to_thread(self._render, messages, tools, add_generation_prompt, continue_final_message,
                                       documents, kwargs, add_special_tokens, field)

    @functools.cached_property
    def _reserved_kwargs(self) -> frozenset[str]:
        """``apply_chat_template``'s own parameters, and what the template gets from them: a kwarg of
        that name would collide with the server's (a TypeError) or override it."""
        import inspect

        own = inspect.signature(self.tokenizer.apply_chat_template).parameters
        return frozenset(n for n, p in own.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)) | {
            "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
            "tokenize"}

    def _render(self, messages, tools, add_generation_prompt, continue_final_message, documents, kwargs,
                add_special_tokens, field) -> list[int]:
        from jinja2 import TemplateError

        if continue_final_message and add_generation_prompt:
            raise InvalidArgument("continue_final_message and add_generation_prompt cannot both be true",
                                  field="continue_final_message")
        # Everything the template reads counts against --max-prompt-chars, before it is rendered.
        n = sum(_chars(m.get("content")) for m in messages)
        n += sum(len(json.dumps(rest, default=str)) for m in messages  # tool calls, names, reasoning ...
                 if (rest := {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}))
        self.check_chars(n, field)
        for name, value in (("tools", tools), ("documents", documents), ("chat_template_kwargs", kwargs)):
            if value:
                n += len(json.dumps(value, default=str))
                self.check_chars(n, name)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **kwargs)
        except TemplateError as e:
            raise InvalidArgument(f"the chat template refused these messages: {e}", field=field) from None
        except ValueError as e:  # transformers' own checks (continue_final_message on a non-assistant turn ...)
            raise InvalidArgument(f"the chat template could not render these messages: {e}", field=field) from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            # The template is the base's; what it was given is the client's (a kwarg or a tool of a
            # type it does not expect).
            where = "chat_template_kwargs" if kwargs else field
            raise InvalidArgument(f"the chat template could not render this request: {type(e).__name__}: {e}",
                                  field=where) from None
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # ------------------------------------------------------------ checks

    def check_chars(self, n: int, field: str) -> None:
        if n > self.max_chars:
            raise InvalidArgument(f"the prompt is {n} characters; this server takes at most {self.max_chars} "
                                  f"(--max-prompt-chars; the context is {self.max_model_len} tokens)", field=field)

    def check_ids(self, ids, field: str) -> None:
        """Token ids a client sent: each must be in the vocabulary (vLLM would fail on it)."""
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidArgument(f"token id {t!r} at position {i} is outside this model's vocabulary "
                                      f"(0..{vocab - 1})", field=field)


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


async def _off_loop(fn, *args, size: int):
    """Small inputs inline (a thread hop costs more than tokenizing them); large ones in a worker
    thread, so that one tenant's long prompt never stalls everyone's streams."""
    if size <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def generation_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling defaults ``vllm serve`` (``--generation-config auto``) takes from the base's
    ``generation_config.json`` for a request that leaves them unset: the non-default values among
    the sampling fields, with ``max_new_tokens`` as ``max_tokens``."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    except (OSError, ValueError):
        return {}
    out = {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
    if config.get("max_new_tokens") is not None:
        out["max_tokens"] = config["max_new_tokens"]
    if out:
        logger.warning("sampling defaults from %s/generation_config.json, as vllm serve takes them: %s",
                       model_dir, out)
    return out


def refuse(field: str, why: str = "") -> UnsupportedParameter:
    return UnsupportedParameter(f"{field} is not supported{': ' + why if why else ''}", field=field)
