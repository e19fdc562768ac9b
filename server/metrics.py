"""Prometheus metrics (`GET /metrics`): latency, tokens, adapter cache, memory.

Every family has the ``loraplex_`` prefix and Prometheus unit suffixes. vLLM's
own engine metrics are registered in the same default registry by vLLM's stat
logger and are exported next to these as ``vllm_*``: vLLM names them
``vllm:*``, but colons are reserved for recording rules and fail
``promtool check metrics``, so ``/metrics`` renames them (and drops ``_total``
from the one vLLM histogram that carries it).

Label cardinality is bounded. ``tenant`` and ``adapter`` labels are given to
the first ``--metrics-top-adapters`` (default 20) adapters, and to their
tenants, that receive traffic after the process starts. Later ones are
reported as ``other``. The base model is ``adapter="-"``. So a server with
thousands of adapters exports at most N+2 adapter series per family.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import psutil
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.registry import Collector
from prometheus_client.metrics_core import GaugeMetricFamily

from server.adapters.residency import Events

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LAG = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LABELS = ("protocol", "tenant", "adapter")

_lock = threading.Lock()
_families: dict[str, object] = {}


def _family(cls, name: str, doc: str, labels=(), **kw):
    # Created once per process: tests start several servers in one interpreter.
    with _lock:
        if name not in _families:
            _families[name] = cls(name, doc, labels, **kw)
        return _families[name]


class LabelBudget:
    """First-N admission for label values; the rest share 'other'."""

    def __init__(self, n: int):
        self.n = n
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.n:
            self._seen.add(value)
            return value
        return "other"


class Series:
    """One (protocol, tenant, adapter) label set's children, looked up once.

    ``Family.labels(...)`` stringifies and validates its arguments and takes a
    lock on every call; a request made seven such calls. The cache is bounded
    by the label budget, and holds the same children the families keep anyway.
    """

    __slots__ = ("labels", "queue", "ttft", "e2e", "tpot", "tokens_in", "tokens_out", "_requests", "_family")

    def __init__(self, m: Metrics, labels: tuple[str, str, str]):
        self.labels = labels
        self.queue = m.queue.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.e2e = m.e2e.labels(*labels)
        self.tpot = m.tpot.labels(*labels)
        self.tokens_in = m.tokens_in.labels(*labels)
        self.tokens_out = m.tokens_out.labels(*labels)
        self._family = m.requests
        self._requests: dict[tuple[str, str], Counter] = {}

    def requests(self, endpoint: str, status: str):
        child = self._requests.get((endpoint, status))
        if child is None:
            child = self._requests[(endpoint, status)] = self._family.labels(*self.labels, endpoint, status)
        return child


class Metrics(Events):
    def __init__(self, *, top_n: int = 20):
        self.adapters = LabelBudget(top_n)
        self.tenants = LabelBudget(top_n)
        self._series: dict[tuple[str, str, str], Series] = {}
        self.requests = _family(Counter, "loraplex_requests_total", "Requests by outcome.",
                                (*_LABELS, "endpoint", "status"))
        self.e2e = _family(Histogram, "loraplex_request_duration_seconds", "End-to-end request latency.",
                           _LABELS, buckets=_LATENCY)
        self.ttft = _family(Histogram, "loraplex_time_to_first_token_seconds", "Time to first token.",
                            _LABELS, buckets=_LATENCY)
        self.tpot = _family(Histogram, "loraplex_time_per_output_token_seconds",
                            "Mean time per output token after the first, per request.", _LABELS, buckets=_PER_TOKEN)
        self.queue = _family(Histogram, "loraplex_queue_duration_seconds",
                             "Time from arrival to the engine accepting the request (auth, adapter load).",
                             _LABELS, buckets=_LATENCY)
        self.tokens_in = _family(Counter, "loraplex_prompt_tokens_total", "Prompt tokens.", _LABELS)
        self.tokens_out = _family(Counter, "loraplex_generation_tokens_total", "Generated tokens.", _LABELS)
        self.load_time = _family(Histogram, "loraplex_adapter_load_duration_seconds",
                                 "Loading an adapter into the engine's host tier (vLLM's add_lora), before the "
                                 "request that needs it goes to the engine.", buckets=_LATENCY)
        self.load_failures = _family(Counter, "loraplex_adapter_load_failures_total",
                                     "Adapter loads vLLM refused (only that adapter's requests failed).")
        self.engine_restarts = _family(Counter, "loraplex_engine_restarts_total",
                                       "Times the server found its vLLM engine dead and started a new one.")
        self.cache_hits = _family(Counter, "loraplex_adapter_cache_hits_total", "Requests whose adapter was loaded.")
        self.cache_misses = _family(Counter, "loraplex_adapter_cache_misses_total", "Requests that loaded an adapter.")
        self.evictions = _family(Counter, "loraplex_adapter_cache_evictions_total", "Adapters evicted (LRU).")

    def labels(self, protocol: str, tenant: str, adapter: str | None) -> tuple[str, str, str]:
        return protocol, self.tenants(tenant), self.adapters(f"{tenant}/{adapter}") if adapter else "-"

    def series(self, protocol: str, tenant: str, adapter: str | None) -> Series:
        """The request metrics' children for this label set (see :class:`Series`)."""
        labels = self.labels(protocol, tenant, adapter)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = Series(self, labels)
        return series

    # residency events
    def hit(self, key: str) -> None:
        self.cache_hits.inc()

    def miss(self, key: str) -> None:
        self.cache_misses.inc()

    def loaded(self, key: str, seconds: float) -> None:
        self.load_time.observe(seconds)

    def load_failed(self, key: str) -> None:
        self.load_failures.inc()

    def evicted(self, key: str) -> None:
        self.evictions.inc()


class StateCollector(Collector):
    """Gauges read at scrape time: adapters per tier, GPU memory, process memory."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        tiers = GaugeMetricFamily("loraplex_adapters", "Adapters per tier.", labels=["tier"])
        for tier, n in self.service.adapter_tiers().items():
            tiers.add_metric([tier], n)
        yield tiers
        cache = GaugeMetricFamily("loraplex_adapter_cache_bytes", "Bytes of adapters loaded in the engine's host tier.")
        cache.add_metric([], self.service.residency.used_bytes)
        yield cache
        budget = GaugeMetricFamily("loraplex_adapter_cache_budget_bytes",
                                   "Byte budget of the engine's host tier (--adapter-cache-bytes).")
        budget.add_metric([], self.service.residency.budget_bytes)
        yield budget
        up = GaugeMetricFamily("loraplex_engine_up", "1 while the vLLM engine serves, 0 while it is dead or restarting.")
        up.add_metric([], 1 if self.service.engine.ready else 0)
        yield up
        yield from _gpu_memory()
        rss = GaugeMetricFamily("loraplex_process_tree_resident_memory_bytes",
                                "Resident memory of the server and its engine processes (the CPU host's device memory).")
        rss.add_metric([], _tree_rss())
        yield rss


def _tree_rss() -> int:
    me = psutil.Process(os.getpid())
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def _gpu_memory():
    """Per-device memory from NVML (the same numbers nvidia-smi shows); nothing on CPU hosts."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return
    used = GaugeMetricFamily("loraplex_gpu_memory_used_bytes", "GPU memory used (all processes).", labels=["device"])
    reserved = GaugeMetricFamily("loraplex_gpu_memory_reserved_bytes", "GPU memory reserved by the driver.",
                                 labels=["device"])
    total = GaugeMetricFamily("loraplex_gpu_memory_total_bytes", "GPU memory total.", labels=["device"])
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            res = info.reserved
        except Exception:
            info, res = pynvml.nvmlDeviceGetMemoryInfo(h), 0
        used.add_metric([str(i)], info.used)
        reserved.add_metric([str(i)], res)
        total.add_metric([str(i)], info.total)
    yield used
    yield reserved
    yield total


# vLLM sets one child of this gauge per distinct (waiting, running) set of adapter names
# and never removes any: with hundreds of adapters it grows by thousands of series an
# hour. loraplex_adapters{tier} says what it would, with bounded labels.
_DROPPED = frozenset({"vllm:lora_requests_info"})


class Exposition:
    """What /metrics serves: the default registry, with vLLM's names made conventional."""

    def collect(self):
        for family in REGISTRY.collect():
            if family.name in _DROPPED:
                continue
            if family.name.startswith("vllm:"):
                old = family.name
                new = old.replace(":", "_")
                if family.type != "counter" and new.endswith("_total"):
                    new = new.removesuffix("_total")
                family.name = new
                family.samples = [s._replace(name=new + s.name[len(old):]) if s.name.startswith(old) else s
                                  for s in family.samples]
            yield family


EXPOSITION = Exposition()


LOOP_LAG_INTERVAL_S = 0.02


async def watch_loop(interval: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sample the event loop's lag forever: how late a timer of ``interval`` fires is how long a
    request waits for the loop behind other work (``loraplex_event_loop_lag_seconds``)."""
    lag = _family(Histogram, "loraplex_event_loop_lag_seconds",
                  f"How late the HTTP event loop ran a timer set {interval * 1000:.0f} ms ahead: the time "
                  "every request waited behind other work on the loop.", buckets=_LAG)
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval)
        lag.observe(max(0.0, time.perf_counter() - start - interval))


def register_state(service) -> None:
    with _lock:
        old = _families.pop("__state__", None)
        if old is not None:
            REGISTRY.unregister(old)
        collector = StateCollector(service)
        REGISTRY.register(collector)
        _families["__state__"] = collector
