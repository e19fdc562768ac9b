"""Quotas and rate limits: 429 with Retry-After, nothing registered past a quota."""

from __future__ import annotations


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
    assert r.status_code == 400 and r.json()["error"]["param"] == "r"
