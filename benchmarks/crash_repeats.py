"""kill -9 of a real server mid-upload, over and over: what does each restart leave?

The server starts with one failpoint armed (``LORAPLEX_FAILPOINTS``, server/failpoints.py); an
upload stops there, and the server and its engine processes are SIGKILLed. The next start arms
the next phase and first repairs what the kill left (``server/adapters/service.py: recover``).
After every restart this counts:

- half-registered adapters: a killed upload the registry or ``GET /v1/adapters`` shows
  (target 0; an upload killed after its commit must be there, whole);
- orphan files: blobs no row refers to, and staging leftovers (target 0);
- an adapter uploaded before the first kill whose greedy output changed (target 0).

    python benchmarks/crash_repeats.py --repeats 10 --out benchmarks/results/cpu/crash_repeats.json

``tests/integration/test_crash_recovery.py`` runs one round over every failpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("upload.body", "upload.blob_stored", "registry.before_commit")
"""The three the issue names: during the body, after the blob is written, before the row commits."""


@dataclass
class Check:
    phase: str
    victim: str
    staging_leftovers: list[str]
    orphan_blobs: list[str]
    missing_blobs: list[str]
    half_registered: bool
    keeper_changed: bool
    recovery_log: list[str]


@dataclass
class Report:
    kills: int = 0
    half_registered: int = 0
    orphan_files: int = 0
    keeper_changed: int = 0
    restart_s: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)


def greedy(c, tenant: str, model: str) -> list[int]:
    r = c.client(tenant).completions.create(model=model, prompt="the date is march", max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    return r.choices[0].model_extra["token_ids"]


def upload_and_die(c, tenant: str, phase: str, name: str, adapter_dir: Path) -> None:
    """Upload ``name`` to a server armed at ``phase``; SIGKILL it and its engine once it gets there."""
    import httpx

    files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter_dir.iterdir()) if f.is_file()]
    mark = c.server.log_size()

    def send():
        try:
            with c.http(tenant) as h:
                h.post("/v1/adapters", data={"name": name}, files=files)
        except httpx.HTTPError:
            pass  # the server died under it

    t = threading.Thread(target=send)
    t.start()
    c.server.wait_for_log(f"failpoint {phase} reached", since=mark)
    c.server.kill9()
    t.join(timeout=60)


def inspect(c, tenant: str, phase: str, victim: str, keeper: str, want: list[int], *, since: int) -> Check:
    """The data directory, the registry and the API after a restart that followed a kill at ``phase``."""
    from server.db import Database

    db = Database.in_data_dir(c.server.data_dir)
    try:
        live = {r[0] for r in db.query("SELECT DISTINCT digest FROM adapters")}
        names = {r[0] for r in db.query("SELECT name FROM adapters WHERE tenant = ?", (tenant,))}
    finally:
        db.close()
    root = c.server.data_dir / "adapters"
    blobs = {p.name for p in (root / "sha256").iterdir()}
    staging = sorted(p.name for p in (root / ".staging").iterdir())
    with c.http(tenant) as h:
        listed = {a["id"] for a in h.get("/v1/adapters").json()["data"]}
    if phase == "upload.committed":  # the row was committed before the kill: it must be there, whole
        half = not (victim in names and victim in listed and greedy(c, tenant, f"tiny:{victim}"))
    else:
        half = victim in names or victim in listed
    half = half or listed != names
    log = c.server.log_path.read_bytes()[since:].decode(errors="replace")
    return Check(phase, victim, staging, sorted(blobs - live), sorted(live - blobs), half,
                 greedy(c, tenant, f"tiny:{keeper}") != want,
                 [line.split("recovery: ", 1)[1][:160] for line in log.splitlines() if "recovery: " in line])


def run(c, tenant: str, adapter_dir: Path, phases: tuple[str, ...], repeats: int) -> Report:
    """Kill at each phase ``repeats`` times; ``c`` is a running Cluster whose server it restarts."""
    report = Report()
    assert c.upload(tenant, "keeper", "a2").status_code == 201
    want = greedy(c, tenant, "tiny:keeper")
    c.server.stop()
    plan = [phase for _ in range(repeats) for phase in phases]
    previous: tuple[str, str] | None = None
    for i, phase in enumerate([*plan, None]):
        c.server.env = {"LORAPLEX_FAILPOINTS": phase} if phase else {}
        mark = c.server.log_size()
        t0 = time.perf_counter()
        c.server.start(600)
        report.restart_s.append(time.perf_counter() - t0)
        if previous is not None:
            check = inspect(c, tenant, *previous, "keeper", want, since=mark)
            report.checks.append(asdict(check))
            report.half_registered += check.half_registered
            report.orphan_files += len(check.staging_leftovers) + len(check.orphan_blobs)
            report.keeper_changed += check.keeper_changed
        if phase is None:
            break
        victim = f"victim-{i}"
        upload_and_die(c, tenant, phase, victim, adapter_dir)
        report.kills += 1
        previous = (phase, victim)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--phases", nargs="+", default=list(PHASES))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-crash")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import shutil

    from tests.integration.conftest import Cluster
    from tests.integration.server_proc import ServerProcess, create_tenant
    from tests.tiny import make_adapter, make_tiny_llama

    shutil.rmtree(a.work, ignore_errors=True)
    base = make_tiny_llama(a.work / "base")
    adapters = {n: make_adapter(base, a.work / "adapters" / n, seed=s) for n, s in (("a2", 2), ("a3", 3))}
    data = a.work / "data"
    keys = {"bench": create_tenant(data, "bench", "--rpm", "100000000")}
    server = ServerProcess(base, data, "--max-loras", "2", log=a.work / "server.log").start()
    c = Cluster(server, keys, adapters, base)
    t0 = time.perf_counter()
    try:
        report = run(c, "bench", adapters["a3"], tuple(a.phases), a.repeats)
    finally:
        if server.proc.poll() is None:
            server.stop()
    result = asdict(report) | {"phases": a.phases, "repeats": a.repeats, "seconds": time.perf_counter() - t0,
                               "host": platform.node(), "command": " ".join(sys.argv)}
    print(json.dumps({k: result[k] for k in ("kills", "half_registered", "orphan_files", "keeper_changed",
                                             "seconds")}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
