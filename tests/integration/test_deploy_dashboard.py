"""deploy/: the Grafana dashboard and the alert rules against a real Prometheus (Debian's
package) scraping the real server's --metrics-port listener with deploy/prometheus's own
config. Every target of every panel must return data after some traffic: a query that names a
family or label the server does not export comes back empty, and fails here."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests import dashboard
from tests.integration.server_proc import free_port

PROMETHEUS = shutil.which("prometheus")
PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
SCRAPE_S = 1
# CI installs the package (scripts/install.sh), so there a missing binary fails the test.
needs_prometheus = pytest.mark.skipif(not PROMETHEUS and not os.environ.get("CI"),
                                      reason="Debian's prometheus package is not installed")


class Prometheus:
    def __init__(self, port: int):
        self.api = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.api}/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, q: str) -> list:
        return self.get("query", query=q)["result"]


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    """deploy/prometheus/prometheus-host.yml pointed at the session server, scraping every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus-host.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{cluster.metrics_port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = Prometheus(port)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if prom.query('up{job="loraplex"} == 1'):
                    break
            except (httpx.HTTPError, ValueError, AssertionError):  # not listening yet, or not ready
                pass
            time.sleep(0.5)
        assert prom.query('up{job="loraplex"} == 1'), "Prometheus never scraped the server"
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _leave_no_adapters(cluster):
    """The session's server is shared: the adapters this module uploads go when it ends."""
    yield
    with cluster.http("alice") as h:
        for adapter in h.get("/v1/adapters").json()["data"]:
            if adapter["id"].startswith("dash-"):
                h.delete(f"/v1/adapters/{adapter['id']}")


def traffic(cluster, adapter: str) -> None:
    """Base and adapter, completions and chat, streamed and not: every label set the panels group by."""
    client = cluster.client("alice")
    for model in ("tiny", f"tiny:{adapter}"):
        for stream in (False, True):
            out = client.completions.create(model=model, prompt="hello world", max_tokens=6, temperature=0,
                                            stream=stream)
            if stream:
                list(out)  # to the end: the request's metrics are recorded when its stream ends
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=stream)
            if stream:
                list(out)


def fresh_adapter(cluster) -> str:
    """A new adapter: its first request is a cache miss and an adapter load."""
    name = f"dash-{uuid.uuid4().hex[:8]}"
    r = cluster.upload("alice", name, "a3")
    assert r.status_code == 201, r.text
    return name


def finite(result: list) -> list[float]:
    values = [float(s["value"][1]) for s in result]
    return [v for v in values if not math.isnan(v)]


@needs_prometheus
def test_every_dashboard_panel_has_data(cluster, prometheus):
    # Prometheus only sees a counter grow between two scrapes of the series. So the first round
    # creates every label set; the second, after a few scrapes, is what rate() sees. A second
    # fresh adapter puts a cache miss and an adapter load inside the window too.
    adapter = fresh_adapter(cluster)
    traffic(cluster, adapter)
    time.sleep(4 * SCRAPE_S)
    cluster.client("alice").completions.create(model=f"tiny:{fresh_adapter(cluster)}", prompt="cold", max_tokens=4)
    traffic(cluster, adapter)
    time.sleep(5 * SCRAPE_S)

    board = dashboard.load()
    on_gpu = "\nloraplex_gpu_memory_used_bytes" in cluster.metrics()
    empty, nan = [], []
    for q in dashboard.queries(board):
        result = prometheus.query(dashboard.promql(q.expr, board, rng="1m"))  # a bad query fails in get()
        if q.gpu_only and not on_gpu:
            assert result == [], (q.panel, "NVML is absent here, yet the GPU panel has data")
            continue
        if not result:
            empty.append(f"{q.panel} [{q.ref}]: {q.expr}")
        elif not finite(result):
            nan.append(f"{q.panel} [{q.ref}]: {q.expr}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)
    assert not nan, "panels with only NaN (no traffic in the window?):\n" + "\n".join(nan)

    def one(q: str) -> float:
        (v,) = finite(prometheus.query(dashboard.promql(q, board)))
        return v

    assert one('count(up{job="loraplex"} == 1) or vector(0)') == 1
    assert one('sum(rate(loraplex_generation_tokens_total{adapter=~".*"}[$__rate_interval]))') > 0
    by_adapter = prometheus.query(dashboard.promql(
        "histogram_quantile(0.99, sum by (le, adapter) (rate(loraplex_time_to_first_token_seconds_bucket"
        "[$__rate_interval])))", board))
    ttft = {s["metric"]["adapter"]: float(s["value"][1]) for s in by_adapter}
    assert 0 < ttft[f"alice/{adapter}"] < 60 and 0 < ttft["-"] < 60
    assert one("loraplex_process_tree_resident_memory_bytes") > 100 * 2**20


@needs_prometheus
def test_template_variables_list_what_was_served(cluster, prometheus):
    # Grafana's label_values(selector, label) is Prometheus's /api/v1/label/<label>/values?match[]=.
    assert cluster.upload("alice", "dash-vars", "a3").status_code in (201, 409)
    traffic(cluster, "dash-vars")
    time.sleep(3 * SCRAPE_S)
    board = dashboard.load()
    values = {}
    for name, var in dashboard.template_variables(board).items():
        if var["type"] != "query":
            continue
        selector, label = var["query"]["query"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        values[name] = prometheus.get(f"label/{label}/values", **{"match[]": dashboard.promql(selector, board)})
    assert "alice" in values["tenant"]
    assert {"alice/dash-vars", "-"} <= set(values["adapter"])
    assert "http" in values["protocol"]
    assert values["instance"] == [f"127.0.0.1:{cluster.metrics_port}"]


@needs_prometheus
def test_alert_rules_evaluate_cleanly_on_real_metrics(prometheus):
    # deploy/prometheus/alerts.yml, loaded by the same config: every rule evaluates without an
    # error against the server's real series, and a healthy server pages for nothing.
    deadline = time.time() + 30
    while time.time() < deadline:
        groups = prometheus.get("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and not any(r["lastEvaluation"].startswith("0001") for r in rules):
            break
        time.sleep(SCRAPE_S)
    names = {r["name"] for r in rules}
    alerts = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    assert names == {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    firing = {a["labels"]["alertname"] for a in prometheus.get("alerts")["alerts"]}
    assert not firing & {"LoraplexDown", "LoraplexEngineDown", "LoraplexRequestErrors"}, firing
