"""/metrics: promtool lint, a real Prometheus (Debian's package) scraping the server, and the
isolation rule: its labels name tenants and adapters, so on the API port it needs an admin key;
--metrics-port serves it without one, on a listener of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from tests.integration.server_proc import free_port

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
# CI installs the package (scripts/install.sh), so there a missing binary fails the test.
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL) and not os.environ.get("CI"), reason="Debian's prometheus package is not installed (scripts/install.sh "
                                          "installs it as root: apt-get install prometheus)")


@pytest.fixture(scope="module")
def traffic(cluster):
    assert cluster.upload("alice", "metered", "a1").status_code in (201, 409)
    client = cluster.client("alice")
    for model in ("tiny", "tiny:metered"):
        for _ in range(3):
            client.completions.create(model=model, prompt="hello world", max_tokens=8, temperature=0)
    return cluster


@needs_prometheus
def test_promtool_accepts_the_exposition(traffic):
    text = traffic.metrics()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for family in ("loraplex_request_duration_seconds", "loraplex_time_to_first_token_seconds",
                   "loraplex_time_per_output_token_seconds", "loraplex_queue_duration_seconds",
                   "loraplex_adapter_load_duration_seconds", "loraplex_requests_total",
                   "loraplex_adapter_cache_hits_total", "loraplex_adapter_cache_misses_total",
                   "loraplex_adapter_cache_evictions_total", "loraplex_prompt_tokens_total",
                   "loraplex_generation_tokens_total", "loraplex_adapters", "loraplex_adapter_cache_bytes",
                   "loraplex_process_tree_resident_memory_bytes", "vllm_num_requests_running"):
        assert f"\n{family}" in text, family


def test_metrics_on_the_api_port_need_an_admin_key(traffic):
    url = f"{traffic.url}/metrics"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(url, headers={"Authorization": f"Bearer {traffic.keys['bob']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert "alice" not in r.text and "metered" not in r.text
    assert 'adapter="alice/metered"' in traffic.metrics()


def test_the_metrics_listener_serves_metrics_and_nothing_else(traffic):
    base = f"http://127.0.0.1:{traffic.metrics_port}"
    text = httpx.get(f"{base}/metrics").text
    assert 'adapter="alice/metered"' in text and "\nloraplex_requests_total" in text
    for path in ("/v1/models", "/v1/adapters", "/health"):
        assert httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {traffic.keys['admin']}"}) \
            .status_code == 404


@needs_prometheus
@pytest.mark.parametrize("listener", ["api port, admin key", "metrics port"])
def test_real_prometheus_scrapes_sane_values(traffic, tmp_path, listener):
    port = free_port()
    if listener == "metrics port":
        target, auth = f"127.0.0.1:{traffic.metrics_port}", ""
    else:  # the documented way: the key in a file Prometheus reads
        (tmp_path / "key").write_text(traffic.keys["admin"])
        target, auth = traffic.url.removeprefix("http://"), f"    authorization: {{credentials_file: {tmp_path / 'key'}}}\n"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: loraplex\n{auth}    static_configs: [{{targets: ['{target}']}}]\n")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(q: str) -> list:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=5)
        return r.json()["data"]["result"]

    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if query('up{job="loraplex"} == 1'):
                    break
            except (httpx.HTTPError, ValueError):  # not listening yet, or 503 "not ready" while it starts
                pass
            time.sleep(0.5)
        assert query('up{job="loraplex"} == 1'), "Prometheus never scraped the server"

        def value(q: str) -> float:
            res = query(q)
            assert res, q
            return float(res[0]["value"][1])

        assert value('sum(loraplex_requests_total{status="ok"})') >= 6
        assert value('sum(loraplex_request_duration_seconds_count{adapter="alice/metered"})') >= 3
        p50 = value("histogram_quantile(0.5, sum by (le) (loraplex_time_to_first_token_seconds_bucket))")
        assert 0 < p50 < 30
        assert 0 < value("histogram_quantile(0.5, sum by (le) (loraplex_time_per_output_token_seconds_bucket))") < 5
        assert value("sum(loraplex_adapter_load_duration_seconds_count)") >= 1
        assert value('loraplex_adapters{tier="registered"}') >= 1
        rss = value("loraplex_process_tree_resident_memory_bytes")
        assert 100 * 2**20 < rss < 64 * 2**30  # server + engine processes: hundreds of MiB, not zero, not absurd
        assert value("sum(loraplex_generation_tokens_total)") >= 48
        assert query("vllm_num_requests_running")  # vLLM's own engine metrics come through too
    finally:
        proc.terminate()
        proc.wait(timeout=30)
