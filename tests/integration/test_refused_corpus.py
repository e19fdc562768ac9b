"""Every adapter of the generated corpus (benchmarks/refused_corpus.py) that raw vLLM refuses is
refused by loraplex too, none is answered with a 5xx, and the shared engine serves after each.

The judge is the session's offline vllm.LLM (the same LoRA settings as the server): add_lora,
then one request with the adapter. Each case is then uploaded to the session's server.
"""

from __future__ import annotations

from benchmarks.refused_corpus import OfflineJudge, run


def test_nothing_vllm_refuses_is_registered_and_nothing_kills_the_engine(cluster, vllm_engine, tmp_path):
    report = run(cluster.url, cluster.keys["admin"], OfflineJudge(vllm_engine), work=tmp_path)  # admins are not rate limited
    assert report.cases >= 300 and report.vllm_refused >= 150  # the corpus is what it says
    assert report.registered_though_vllm_refused == 0, [r for r in report.results
                                                        if r["vllm_refused"] and r["loraplex_registered"]]
    assert report.server_errors == 0, [r for r in report.results if r["loraplex_status"] >= 500]
    assert report.engine_deaths == 0, [r for r in report.results if not r["engine_alive"]]
    assert report.registered_that_failed_to_serve == 0
    good = next(r for r in report.results if r["id"] == "good")
    assert good["loraplex_registered"] and not good["vllm_refused"]  # the control case passes both
    for r in report.results:  # a refusal is a 4xx in OpenAI's shape, naming what is wrong
        if not r["loraplex_registered"]:
            assert 400 <= r["loraplex_status"] < 500 and r["loraplex_message"], r
