"""Quotas and rate limits: 429 with Retry-After, nothing registered past a quota; limits on what a
tenant has in flight, answered with a real status before a stream starts."""

from __future__ import annotations

import json
import socket
import threading

import httpx

from tests.integration.server_proc import create_tenant


def test_rate_limit_gives_429_with_retry_after(cluster):
    with cluster.http("carol") as carol:  # 3 requests per minute
        codes = [carol.get("/v1/models").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = carol.get("/v1/models")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_adapter_count_and_rank_quotas(cluster):
    # dave: at most 1 adapter, rank <= 8
    assert cluster.upload("dave", "first", "a1").status_code == 201
    r = cluster.upload("dave", "second", "a2")
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert "retry-after" not in r.headers  # waiting does not help
    with cluster.http("dave") as dave:
        assert [a["id"] for a in dave.get("/v1/adapters").json()["data"]] == ["first"]
        dave.delete("/v1/adapters/first")
    r = cluster.upload("dave", "big", "a4")  # r=16 > dave's max rank 8
    e = r.json()["error"]
    assert r.status_code == 429 and e["code"] == "quota_exceeded" and e["param"] == "r"
    assert "dave" in e["message"] and "quota" in e["message"] and "--max-lora-rank" not in e["message"]
    with cluster.http("dave") as dave:
        assert dave.get("/v1/adapters").json()["data"] == []


def _long_stream(cluster, key: str, started: threading.Event, done: threading.Event, n: int = 128) -> None:
    """A stream that stays in flight until ``done``: its client reads the first bytes through a
    4 KiB window and then stops, and the answer (``n`` choices x 200 tokens, each with its 20 top
    logprobs) is more than the socket buffers hold, so the server cannot finish it before the
    test lets go, however fast the engine is."""
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True,
                       "n": n, "temperature": 1.0, "logprobs": 20}).encode()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", cluster.server.port))
    with raw:
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        first = raw.recv(512)
        assert first.startswith(b"HTTP/1.1 200"), first
        started.set()
        done.wait(60)


def test_a_tenant_at_its_concurrency_limit_gets_a_real_429_even_when_streaming(cluster):
    key = create_tenant(cluster.server.data_dir, "erin", "--max-concurrency", "1")
    started, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_long_stream, args=(cluster, key, started, done))
    t.start()
    try:
        assert started.wait(60)
        client = cluster.client("alice").with_options(api_key=key)
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4,
                                                           "stream": True}) as r:
                assert r.status_code == 429 and r.headers["content-type"].startswith("application/json")
                assert int(r.headers["retry-after"]) >= 1
                r.read()
                assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
        # Other tenants are not held back by erin's limit.
        assert cluster.client("bob").completions.create(model="tiny", prompt="x", max_tokens=2).choices
    finally:
        done.set()
        t.join()
    # The slot is given back when the stream ends.
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_tokens_in_flight_are_limited_per_tenant(cluster):
    key = create_tenant(cluster.server.data_dir, "frank", "--max-inflight-tokens", "240")
    with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 200, "n": 2,
                                            "temperature": 1.0})
        e = r.json()["error"]
        assert r.status_code == 429 and e["code"] == "quota_exceeded" and e["param"] == "max_tokens"
        assert "retry-after" not in r.headers  # 400 tokens never fit: waiting does not help
    started, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_long_stream, args=(cluster, key, started, done, 1))  # holds 200 tokens
    t.start()
    try:
        assert started.wait(60)
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 100})
            assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
            assert h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 40}).status_code == 200
    finally:
        done.set()
        t.join()


def test_each_prompt_of_a_request_counts_as_a_request_in_flight(cluster):
    """A list of prompts fans out into one engine request each: 100,000 one-token prompts (half a
    MiB, under the body cap and --max-request-values) are refused before any is tokenized, and the prompts of a request
    that is taken count one by one against the tenant's concurrency."""
    key = create_tenant(cluster.server.data_dir, "gina", "--max-concurrency", "4")
    with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        for prompt in ([[1]] * 100_000, ["x"] * 100_000, ["x"] * 5):
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
            e = r.json()["error"]
            assert r.status_code == 400 and e["param"] == "prompt", e
            assert f"{len(prompt)} prompts" in e["message"] and "at most 4" in e["message"]
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 4, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
    started, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_long_stream, args=(cluster, key, started, done, 1))  # holds 1 of 4
    t.start()
    try:
        assert started.wait(60)
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 4, "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert "runs 4 prompts" in r.json()["error"]["message"]
            assert h.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 3,
                                                   "max_tokens": 2}).status_code == 200
        # A bystander is not held back.
        assert cluster.client("bob").completions.create(model="tiny", prompt="x", max_tokens=2).choices
    finally:
        done.set()
        t.join()
