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
