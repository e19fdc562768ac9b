"""Hot replace under load: streams keep going while an adapter is replaced 20 times.

Every request must succeed; a request that starts after a PUT returned must be
served by the new version (no stale adapter, no stale prefix cache).
"""

from __future__ import annotations

import threading

PROMPT = [{"role": "user", "content": "month october day 9 the date is"}]


def greedy(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_replace_20_times_under_streaming_load(cluster):
    client = cluster.client("bob")
    for name, adapter in (("ref-a1", "a1"), ("ref-a2", "a2"), ("swap", "a1")):
        assert cluster.upload("bob", name, adapter).status_code == 201
    expected = {"a1": greedy(client, "tiny:ref-a1"), "a2": greedy(client, "tiny:ref-a2")}
    assert expected["a1"] != expected["a2"]
    assert greedy(client, "tiny:swap") == expected["a1"]

    stop = threading.Event()
    failures: list[str] = []
    completed = [0]

    def stream_forever():
        c = cluster.client("bob")
        while not stop.is_set():
            try:
                chunks = list(c.chat.completions.create(model="tiny:swap", messages=PROMPT, max_tokens=24,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}))
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
                if finish[-1] != "length":
                    failures.append(f"unexpected finish {finish[-1]}")
                completed[0] += 1
            except Exception as e:  # any failed request fails the test
                failures.append(repr(e))

    threads = [threading.Thread(target=stream_forever) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        versions = []
        for i in range(20):
            adapter = "a2" if i % 2 == 0 else "a1"
            r = cluster.upload("bob", "swap", adapter, method="PUT")
            assert r.status_code == 200, r.text
            versions.append(r.json()["version"])
            assert greedy(client, "tiny:swap") == expected[adapter], f"replace {i}: stale output"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert failures == []
    assert completed[0] >= 8
    assert versions == list(range(2, 22))
    with cluster.http("bob") as h:
        card = h.get("/v1/adapters/swap").json()
    assert card["version"] == 21
