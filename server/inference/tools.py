"""Tool calling for chat: ``tools`` and ``tool_choice`` in, ``tool_calls`` out, as vLLM does it.

- ``tool_choice: "none"`` (or no tools): the tools are rendered into the prompt, the output is text.
- ``"required"`` and a named function are *constrained*: the output must match a JSON schema
  built from the tools (vLLM's own: an array of ``{"name", "parameters"}`` objects for required,
  the function's ``parameters`` for a named one), compiled by vLLM's structured-output backend,
  so the call parses whatever the model -- even a tiny random one. Neither needs a parser.
- ``"auto"`` (what an unset ``tool_choice`` means when a parser is configured) asks the model
  and parses its text with the ``--tool-call-parser`` named at start (one of vLLM's parsers,
  run by the engine module), which ``--enable-auto-tool-choice`` turns on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.engine.types import Structured
from server.errors import InvalidArgument


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str
    id: str = field(default_factory=call_id)

    def wire(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for this generation."""

    mode: str
    """none | required | named | auto"""
    tools: list[dict] | None
    """The tools, OpenAI-shaped, for the chat template."""
    function: str | None = None
    """The named function."""
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def structured(self) -> Structured | None:
        if self.mode == "named":
            return Structured("json", _params(self._tool(self.function)))
        if self.mode == "required":
            schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
                {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": _params(t)},
                 "required": ["name", "parameters"]} for t in self.tools or ()]}}
            if not self.parallel:
                schema["maxItems"] = 1
            defs = {}
            for t in self.tools or ():
                defs |= (t["function"].get("parameters") or {}).get("$defs") or {}
            if defs:
                schema["$defs"] = defs
            return Structured("json", schema)
        return None

    def _tool(self, name: str) -> dict:
        for t in self.tools or ():
            if t["function"]["name"] == name:
                return t
        raise InvalidArgument(f"tool_choice names function {name!r}, which is not in tools", field="tool_choice")

    def parse(self, text: str) -> list[ToolCall]:
        """The tool calls in a constrained output (required: the JSON array; named: the arguments)."""
        if self.mode == "named":
            return [ToolCall(self.function, text)] if text.strip() else []
        if self.mode == "required":
            try:
                calls = json.loads(text)
            except ValueError:
                return []  # cut off by max_tokens: no complete call
            return [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                    for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
        return []


def _params(tool: dict) -> dict:
    params = dict(tool["function"].get("parameters") or {"type": "object", "properties": {}})
    params.pop("$defs", None)
    return params


def plan(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool | None, *,
         auto_available: bool) -> ToolPlan:
    """Resolve ``tool_choice`` against ``tools`` (already schema-checked by the front)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidArgument("tool_choice needs tools", field="tool_choice")
        return ToolPlan("none", None)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidArgument("two tools share a name", field="tools")
    parallel = parallel_tool_calls is not False
    if isinstance(tool_choice, dict):
        p = ToolPlan("named", tools, tool_choice["function"]["name"], parallel)
        p._tool(p.function)
        return p
    if tool_choice == "required":
        return ToolPlan("required", tools, parallel=parallel)
    if tool_choice == "auto":
        if not auto_available:
            raise InvalidArgument('"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                                  "and --tool-call-parser", field="tool_choice")
        return ToolPlan("auto", tools, parallel=parallel)
    if tool_choice is None and auto_available:  # OpenAI's default with tools: the model decides
        return ToolPlan("auto", tools, parallel=parallel)
    return ToolPlan("none", tools)  # "none", or unset without a parser: rendered, never parsed (as vLLM)
