"""loraplex side by side with vLLM's own OpenAI server, on the same tiny base and adapter.

Both servers start from the same vLLM flag names (``--model``, ``--served-model-name``,
``--kv-cache-memory-bytes``, ``--lora-modules``, ``--max-num-seqs``, ``--enable-auto-tool-choice
--tool-call-parser hermes``, and ``--block-size``, which loraplex passes through to vLLM unread).
The same requests go to both; for each, every field vLLM returns must be in loraplex's response
with the same type, and greedy text and token ids must be equal. Differences kept on purpose
are in :data:`DIFFERENCES` and in the README.
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.integration.server_proc import RawProcess, ServerProcess, create_tenant, free_port

DIFFERENCES = {
    # Values that differ on purpose, with the same type: loraplex's response id is the request
    # id itself (X-Request-Id, or one it makes), vLLM prefixes its own; the system fingerprint
    # names loraplex's version too. Compared by type only.
}
SAME_SHAPE_ONLY = {
    # Requests whose answers differ on purpose (README, "Differences from vllm serve"): compared
    # by shape, not by content.
    "echo": "vLLM 0.32 returns only the completion; loraplex prepends the prompt, as OpenAI does",
    "tool_choice": "for required/named calls vLLM 0.32 constrains hermes's own <tool_call> syntax (the "
                   "tiny model then writes numbers for arguments); loraplex constrains vLLM's JSON tool-call "
                   "schema, whatever the parser",
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                           "days": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ENGINE = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
          "--kv-cache-memory-bytes", str(64 << 20), "--max-lora-rank", "16", "--max-loras", "2", "--seed", "0",
          "--max-num-seqs", "32", "--block-size", "32", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
          "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']


@pytest.fixture(scope="module")
def pair(tiny_base, adapter_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("differential")
    adapter = adapter_dirs["a1"]
    data = tmp / "data"
    key = create_tenant(data, "default")
    ours = ServerProcess(tiny_base, data, "--lora-modules", f"a1={adapter}", log=tmp / "loraplex.log",
                         engine=tuple(ENGINE))
    ours.argv[ours.argv.index("--base")] = "--model"  # vLLM's name for it
    port = free_port()
    raw = RawProcess([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_base),
                      "--port", str(port), "--enable-lora", "--lora-modules", f"a1={adapter}", *ENGINE],
                     port, tmp / "vllm.log")
    ours.start()
    raw.start()
    yield ours, key, raw
    ours.stop()
    raw.stop()


def _same_shape(ours, theirs, path="") -> list[str]:
    """Paths where loraplex lacks a field vLLM returns, or has it with another type."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{path}: {type(ours).__name__} vs dict"]
        out = []
        for k, v in theirs.items():
            if k in DIFFERENCES:
                continue
            if k not in ours:
                out.append(f"{path}.{k}: missing")
            else:
                out += _same_shape(ours[k], v, f"{path}.{k}")
        return out
    if isinstance(theirs, list):
        if not isinstance(ours, list):
            return [f"{path}: {type(ours).__name__} vs list"]
        if theirs and not isinstance(theirs[0], (dict, list)):  # token ids, offsets: the element type
            return _same_shape(ours[0], theirs[0], f"{path}[]") if ours else []
        if len(ours) != len(theirs):
            return [f"{path}: {len(ours)} items vs {len(theirs)}"]
        return [p for o, t in zip(ours, theirs) for p in _same_shape(o, t, f"{path}[]")]
    if type(ours) is not type(theirs) and not (isinstance(ours, (int, float)) and isinstance(theirs, (int, float))):
        return [f"{path}: {type(ours).__name__} vs {type(theirs).__name__}"]
    return []


def _content(resp: dict) -> list:
    """What must be equal: per choice, text or message content, tool calls (without their random
    ids) and token ids."""
    out = []
    for c in resp.get("choices", []):
        if "message" in c:
            m = c["message"]
            calls = [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in m.get("tool_calls") or []]
            out.append((c["index"], m.get("content"), calls, c.get("token_ids"), c.get("finish_reason")))
        else:
            out.append((c["index"], c["text"], c.get("token_ids"), c.get("finish_reason")))
    return out


COMPLETIONS = [
    {"prompt": "the date is", "max_tokens": 12},
    {"prompt": "the date is", "max_tokens": 20, "stop": ["e"]},
    {"prompt": "hello world", "max_tokens": 6, "logprobs": 3},
    {"prompt": "the date is", "max_tokens": 6, "echo": True},
    {"prompt": "hello", "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 5},  # vLLM 0.32 refuses greedy n > 1
    {"prompt": ["hello", "the date is"], "max_tokens": 5},
    {"prompt": [5, 17, 33, 2], "max_tokens": 6},
    {"prompt": "the date is", "max_tokens": 16, "presence_penalty": 1.5, "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 16, "frequency_penalty": 1.0, "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 16, "repetition_penalty": 1.3, "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 8, "temperature": 0.9, "top_k": 1, "seed": 1},
    {"prompt": "the date is", "max_tokens": 8, "temperature": 0.9, "min_p": 1.0, "seed": 2},
    {"prompt": "the date is", "max_tokens": 4, "logit_bias": {"7": 100}},
    {"prompt": "the date is", "max_tokens": 8, "stop_token_ids": [7]},
    {"prompt": "the date is", "max_tokens": 12, "min_tokens": 6, "stop": ["a"]},
    {"prompt": "the date is", "max_tokens": 12, "stop": ["e"], "include_stop_str_in_output": True},
    {"prompt": "the date is", "max_tokens": 30, "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 8, "skip_special_tokens": False, "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 8, "bad_words": ["e"], "ignore_eos": True},
    {"prompt": "the date is", "max_tokens": 8, "allowed_token_ids": [5, 6, 7, 8]},
]
CHATS = [
    {"messages": USER, "max_tokens": 12},
    {"messages": USER, "max_tokens": 9, "max_completion_tokens": 4},
    {"messages": USER, "max_tokens": 4, "logprobs": True, "top_logprobs": 2},
    {"messages": USER, "max_tokens": 80, "response_format": {"type": "json_object"}},
    {"messages": USER, "max_tokens": 80, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": SCHEMA, "strict": True}}},
    {"messages": USER, "max_tokens": 8, "structured_outputs": {"choice": ["sunny", "rainy"]}},
    {"messages": USER, "max_tokens": 12, "structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}},
    {"messages": USER, "max_tokens": 100, "tools": [WEATHER], "tool_choice": "required"},
    {"messages": USER, "max_tokens": 60, "tools": [WEATHER],
     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"messages": USER, "max_tokens": 10, "tools": [WEATHER], "tool_choice": "auto"},
    {"messages": USER, "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 6},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in"},
                                               {"type": "text", "text": "Paris?"}]}], "max_tokens": 6},
    {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [WEATHER], "tool_choice": "none",
     "max_tokens": 6},
    {"messages": USER, "max_tokens": 8, "temperature": 0.7, "min_p": 1.0, "seed": 4},
]


def _post(url: str, path: str, body: dict, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, (path, body, r.text)
    return r.json()


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_same_answers_and_fields_as_vllm(pair, adapter):
    ours, key, raw = pair
    shapes, differ = [], []
    for path, cases in (("/v1/completions", COMPLETIONS), ("/v1/chat/completions", CHATS)):
        for case in cases:
            body = {"temperature": 0, "return_token_ids": True, **case}
            mine = _post(ours.url, path, {**body, "model": "tiny:a1" if adapter else "tiny"}, key)
            theirs = _post(raw.url, path, {**body, "model": "a1" if adapter else "tiny"})
            shapes += [f"{path} {case}: {p}" for p in _same_shape(mine, theirs)]
            on_purpose = any(case.get(k) not in (None, False, "none", "auto") for k in SAME_SHAPE_ONLY)
            if not on_purpose and _content(mine) != _content(theirs):
                differ.append((path, case, _content(mine), _content(theirs)))
    assert not shapes, "\n".join(shapes[:20])
    assert not differ, "\n".join(map(str, differ[:5]))


def test_streams_carry_the_same_text_and_usage(pair):
    ours, key, raw = pair

    def stream(url, path, body, key=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    for path, body in (("/v1/completions", {"prompt": "the date is", "max_tokens": 10}),
                       ("/v1/chat/completions", {"messages": USER, "max_tokens": 10})):
        body = {**body, "model": "tiny", "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        mine, theirs = stream(ours.url, path, body, key), stream(raw.url, path, body)

        def text(chunks):
            return "".join(c["text"] if "text" in c else (c["delta"].get("content") or "")
                           for ch in chunks for c in ch["choices"])

        assert text(mine) == text(theirs)
        assert mine[-1]["usage"] == theirs[-1]["usage"] and mine[-1]["choices"] == theirs[-1]["choices"] == []
        assert not _same_shape(mine[1], theirs[1])
