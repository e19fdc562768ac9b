"""The load generator's workload and statistics (its network side runs in benchmarks)."""

import numpy as np

from benchmarks.loadgen import Record, Workload, summarize


def test_power_law_popularity():
    w = Workload(models=("a", "b", "c", "d"), alpha=1.0)
    assert np.allclose(w.weights(), np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert np.allclose(Workload(models=("a", "b"), alpha=None).weights(), [0.5, 0.5])


def test_summary_percentiles_and_errors():
    recs = [Record("m", 0, ttft=0.1 * i, e2e=1.0 + 0.1 * i, output_tokens=11) for i in range(1, 11)]
    recs.append(Record("m", 0, error="APIError: boom"))
    s = summarize(recs, wall=10.0)
    assert (s.requests, s.errors) == (10, 1) and s.error_samples == ["APIError: boom"]
    assert s.requests_per_s == 1.0 and s.output_tokens_per_s == 11.0
    assert abs(s.ttft_s["p50"] - 0.55) < 1e-9
    assert abs(recs[0].tpot - 0.1) < 1e-9  # (e2e - ttft) / (tokens - 1) = (1.1 - 0.1) / 10


def test_the_worst_adapter_is_the_one_whose_requests_waited_longest():
    from benchmarks.compare import worst_adapter

    recs = [Record("hot", 0, ttft=0.1) for _ in range(50)] + [Record("rare", 0, ttft=3.0),
                                                              Record("rare", 0, error="boom")]
    assert worst_adapter(recs) == {"ttft_p99_s_worst_adapter": 3.0, "worst_adapter": "rare", "adapters_served": 2}


def test_many_adapters_report_rows_and_ratios():
    from benchmarks.many_adapters import rows_of, targets

    def row(system, n, tok, popularity="alpha"):
        return {"system": system, "adapters": n, "popularity": popularity, "output_tokens_per_s": tok,
                "ttft_s": {"p99": 1.0}, "requests": 10, "errors": 0, "startup_s": 100.0,
                "ttft_p99_s_worst_adapter": 2.0}

    docs = [{"args": {"alpha": 1.0, "max_loras": 128, "max_cpu_loras": 512, "engine_extra": "--specialize-active-lora"},
             "results": [row("loraplex", 1, 1000.0), row("loraplex", 1000, 700.0), row("loraplex", 1000, 500.0, "uniform")]},
            {"args": {"alpha": 1.0, "quantization": "bitsandbytes"}, "results": [row("vllm-documented", 1000, 350.0)]},
            {"args": {"alpha": 1.0}, "results": [row("vllm-documented", 1000, 350.0)]}]
    rows = [r for d in docs for r in rows_of(d)]
    assert [(r["system"], r["quant"], r["popularity"]) for r in rows][2:4] == [
        ("loraplex", "bf16", "uniform"), ("vllm-documented", "bnb4", "alpha1")]
    assert rows[0]["engine_flags"] == "--max-loras 128 --max-cpu-loras 512 --specialize-active-lora"
    got = {t: m for t, _, m in targets(rows)}
    assert got["loraplex, 1000 adapters vs 1 adapter, alpha=1"].startswith("0.70x")
    assert got["loraplex vs vllm-documented, 1000 adapters, alpha1"].startswith("2.00x")  # bf16 against bf16
    assert got["loraplex vs vllm-same-slots, 1000 adapters, alpha1"] == "not measured"


def test_a_run_cut_short_is_read_from_its_partial_rows(tmp_path):
    import json

    from benchmarks.many_adapters import load, rows_of

    row = {"system": "loraplex", "adapters": 32, "popularity": "uniform", "output_tokens_per_s": 5200.0,
           "ttft_s": {"p99": 0.9}, "requests": 10, "errors": 0}
    (tmp_path / "loraplex-tuned-partial.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row | {"adapters": 1}))
    doc = load(tmp_path / "loraplex-tuned-partial.jsonl")
    rows = rows_of(doc)
    assert [(r["adapters"], r["popularity"], r["run"]) for r in rows] == [
        (32, "uniform", "loraplex-tuned-partial"), (1, "uniform", "loraplex-tuned-partial")]
    assert rows[0]["engine_start_s"] is None and rows[0]["engine_flags"] is None  # not written before the cut
