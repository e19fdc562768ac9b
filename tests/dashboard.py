"""deploy/grafana/loraplex.json's queries as plain PromQL, for promtool and a real Prometheus.

Grafana fills in its own variables before it sends a query; so does :func:`promql`:
``$__rate_interval`` and friends become a concrete range, and the dashboard's template
variables (``$tenant``, ``$adapter`` ...) their "All" value, ``.*``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "loraplex.json"
GPU_ONLY = "(GPU hosts)"
"""Panels titled with this are empty on a host without NVML (the CPU hosts tests run on)."""

_BUILTIN_RANGES = ("__rate_interval", "__interval", "__range")


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    """As in the dashboard, with Grafana's variables."""

    @property
    def gpu_only(self) -> bool:
        return GPU_ONLY in self.panel


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def template_variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def queries(dashboard: dict | None = None) -> list[Query]:
    """Every target of every panel (rows included, collapsed or not)."""
    dashboard = dashboard or load()
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append(Query(p["title"], t["refId"], t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def promql(expr: str, dashboard: dict | None = None, *, rng: str = "1m") -> str:
    """``expr`` as Grafana would send it with every variable at "All" and ranges of ``rng``."""
    names = set(template_variables(dashboard or load()))

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in _BUILTIN_RANGES:
            return rng
        if name in names:
            return ".*"
        raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def series_names(expr: str) -> set[str]:
    """The loraplex_*/vllm_* series names a query reads, as written (``..._bucket`` for a histogram)."""
    return set(re.findall(r"\b((?:loraplex|vllm)_[a-z0-9_]+)", expr))
