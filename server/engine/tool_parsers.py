"""vLLM's tool-call parsers (``--tool-call-parser``), run on loraplex's outputs.

``tool_choice: "auto"`` leaves it to the model whether to call a tool, in whatever syntax its
chat template taught it (Hermes' ``<tool_call>`` tags, Llama's JSON, pythonic calls ...). vLLM
ships one parser per syntax; loraplex runs the one named at start, exactly as ``vllm serve
--enable-auto-tool-choice --tool-call-parser NAME`` does, on whole outputs and on streams.
Parsers are per request (they keep state while streaming).
"""

from __future__ import annotations

import uuid

from server.engine.vllm_engine import EngineConfigError


def _manager():
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # older vLLM lines keep them with the OpenAI server
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    return ToolParserManager


def _request_class():
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest
    return ChatCompletionRequest


def available() -> list[str]:
    manager = _manager()
    names = set(getattr(manager, "tool_parsers", {}) or {}) | set(getattr(manager, "lazy_parsers", {}) or {})
    return sorted(names)


class ToolParsers:
    """The configured parser, for the whole server."""

    def __init__(self, name: str, tokenizer):
        try:
            self.cls = _manager().get_tool_parser(name)
        except KeyError:
            raise EngineConfigError(f"--tool-call-parser {name!r} is not one of the installed vLLM's parsers: "
                                    f"{', '.join(available())}") from None
        self.name, self.tokenizer = name, tokenizer

    def for_request(self, tools: list[dict] | None) -> RequestParser:
        return RequestParser(self, tools)


class RequestParser:
    def __init__(self, parsers: ToolParsers, tools: list[dict] | None):
        self._parsers, self.tools = parsers, tools
        self.request = _request_class().model_validate(
            {"model": "loraplex", "messages": [{"role": "user", "content": ""}], "tools": tools or None,
             "tool_choice": "auto"})

    def _new(self):
        try:
            return self._parsers.cls(self._parsers.tokenizer, self.request.tools)
        except TypeError:  # parsers that take the tokenizer only
            return self._parsers.cls(self._parsers.tokenizer)

    def extract(self, text: str) -> tuple[list[dict], str | None]:
        """(tool calls as {id, name, arguments}, the content left) of a whole output."""
        info = self._new().extract_tool_calls(text, self.request)
        if not info.tools_called:
            return [], text
        calls = [{"id": tc.id or f"chatcmpl-tool-{uuid.uuid4().hex}", "name": tc.function.name,
                  "arguments": tc.function.arguments} for tc in info.tool_calls]
        content = info.content if info.content and info.content.strip() else None
        return calls, content

    def streamer(self) -> Streamer:
        return Streamer(self._new(), self.request)


class Streamer:
    """One choice's stream through the parser: each delta of text becomes a delta message (some
    content, a tool call's name, a piece of its arguments) or nothing yet."""

    def __init__(self, parser, request):
        self.parser, self.request = parser, request
        self.ids: list[int] = []
        self.called = False

    def delta(self, previous_text: str, current_text: str, delta_text: str, delta_ids: list[int]) -> dict | None:
        previous_ids = self.ids
        self.ids = previous_ids + list(delta_ids)
        message = self.parser.extract_tool_calls_streaming(previous_text, current_text, delta_text, previous_ids,
                                                           self.ids, list(delta_ids), self.request)
        if message is None:
            return None
        out = message.model_dump(exclude_none=True)
        if out.get("tool_calls"):
            self.called = True
        return out or None
