"""No tenant's request holds the event loop: the server's own loop-lag histogram, read around hostile
bodies of up to 8 MiB, has no sample over 50 ms (issue 21).

Each body here took the loop for 0.1 to 17 s before: FastAPI parsed and validated it on the loop,
pydantic built one error per bad item of a list (a million floats as a prompt: 17 s), and a million
small arrays cost a fifth of a second to parse, validate and free. Now a large body is parsed in
pieces and validated in a worker thread (server/api/http/body.py), lists stop at their first bad
item, and the number of JSON values is bounded (--max-request-values, 262,144 here): a million ints
are valid JSON for a prompt, but pydantic checks them in one 20-100 ms C call no thread interrupts.
"""

from __future__ import annotations

import json
import re

import pytest

LIMIT_S = 0.05
N = 200_000  # under --max-request-values: these reach validation
MANY = 1_000_000  # over it


def lag(c) -> dict[str, float]:
    """loraplex_event_loop_lag_seconds's cumulative buckets so far, by upper bound."""
    return {le: float(n) for le, n in
            re.findall(r'^loraplex_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', c.metrics(), re.M)}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


HI = [{"role": "user", "content": "hi"}]
HOSTILE = [  # (path, body, status, the field the error names)
    ("/v1/completions", body({"model": "tiny", "prompt": [1.5] * N}), 400, "prompt"),
    ("/v1/completions", body({"model": "tiny", "prompt": [[1]] * MANY}), 400, "body"),
    ("/v1/completions", body({"model": "tiny", "prompt": list(range(N)), "max_tokens": 1}), 400, "prompt"),
    ("/v1/completions", body({"model": "tiny", "prompt": list(range(MANY)), "max_tokens": 1}), 400, "body"),
    ("/v1/completions", body({"model": "tiny", "prompt": "hi", "stop_token_ids": ["x"] * N}), 400,
     "stop_token_ids[0]"),
    ("/v1/completions", body({"model": "tiny", "prompt": ["hi"] * MANY}), 400, "body"),
    ("/v1/chat/completions", body({"model": "tiny", "messages": HI * 200_000}), 400, "body"),
    ("/v1/chat/completions", body({"model": "tiny", "messages": [1] * N}), 400, "messages[0]"),
    ("/v1/chat/completions", body({"model": "tiny", "messages": HI, **{f"k{i}": 1 for i in range(30_000)}}),
     400, "k0"),
    ("/v1/chat/completions", body({"model": "tiny", "messages": HI,
                                   "chat_template_kwargs": {f"k{i}": [] for i in range(300_000)}}), 400, "body"),
    ("/detokenize", body({"model": "tiny", "tokens": [1.5] * N}), 400, "tokens[0]"),
]


@pytest.fixture(scope="module")
def alice(cluster):
    with cluster.http("alice") as h:
        yield h


def test_hostile_bodies_never_hold_the_loop(cluster, alice):
    """Each body's 400 names its field, and while the server works on it no loop-lag sample is over
    50 ms. A body that holds the loop does so every time it is sent; the 2-core CI host's scheduler
    can stall a process once in a while whatever it runs. So a body that saw a slow sample is sent
    again, at most twice, and must run clean once; the report gives each slow sample's bucket."""
    def send(path, raw):
        return alice.post(path, content=raw, headers={"content-type": "application/json"})

    for path, raw, _, _ in HOSTILE[:2]:  # the first large body of each kind pays for imports, not loop time
        send(path, raw)
    blocked, sampled = {}, 0
    for path, raw, status, field in HOSTILE:
        for _ in range(3):
            before = lag(cluster)
            r = send(path, raw)
            after = lag(cluster)
            assert r.status_code == status, (path, r.text[:300])
            assert r.json()["error"]["param"] == field, (path, r.json())
            sampled += after["+Inf"] - before["+Inf"]
            limit = str(LIMIT_S)
            slow = {le: (after[le] - after[limit]) - (before[le] - before[limit]) for le in after if float(le) > LIMIT_S}
            if not slow["+Inf"]:
                blocked.pop((path, field), None)
                break
            blocked[(path, field)] = slow  # samples at or below each bound, of those over 50 ms
    assert sampled > 0, "the loop-lag sampler is not running"
    assert not blocked, f"bodies that held the loop over {LIMIT_S * 1000:.0f} ms on each of 3 tries: {blocked}"


def test_a_body_with_too_many_values_names_the_flag(alice):
    r = alice.post("/v1/completions", content=body({"model": "tiny", "prompt": [[1]] * 140_000}),
                   headers={"content-type": "application/json"})  # 280,001 values in 1.1 MB
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "body" and "--max-request-values" in r.json()["error"]["message"]


def test_large_valid_bodies_take_the_same_path_as_small_ones(alice):
    """A prompt over 64 KiB goes through the worker thread; it is answered as a small one is."""
    text = "hello " * 20_000  # 120 KB: off the loop
    r = alice.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # over the tiny base's context
    ids = [5] * 12_000  # 60 KB of ids: also over the context, a 400 naming prompt
    r = alice.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    bad = b'{"model": "tiny", "prompt": "' + b"x" * 70_000 + b'"'  # unterminated, over 64 KiB
    r = alice.post("/v1/completions", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    padded = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2,' + b" " * 100_000 + b'"temperature": 0}'
    r = alice.post("/v1/completions", content=padded, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


@pytest.mark.parametrize("depth", [257, 100_000])
def test_a_body_nested_too_deep_is_refused_before_it_is_parsed(alice, depth):
    """Small (parsed on the loop) or large (in pieces): one rule, 256 levels, a 400 naming body."""
    deep = b'{"model": "tiny", "prompt": "hi", "response_format": ' + b"[" * depth + b"]" * depth + b"}"
    r = alice.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    assert "256 deep" in r.json()["error"]["message"]
