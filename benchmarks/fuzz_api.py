"""Fuzz every endpoint in /openapi.json with schemathesis, as a tenant and as an admin, and count
what came back 5xx.

One real ``python -m server`` on a tiny random Llama (made in the run), with one adapter already
uploaded and a ``--lora-roots`` for the admin's ``/v1/load_lora_adapter``. schemathesis generates
valid and invalid requests from the schema for ``--tenant-minutes`` with a tenant's key, then
``--admin-minutes`` with an admin's. The figures are the server's own access log, by status, so
nothing schemathesis decides hides a 5xx; its own failing checks are listed too.

    python benchmarks/fuzz_api.py --tenant-minutes 10 --admin-minutes 5 --out benchmarks/results/cpu/fuzz_api.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def statuses(log: Path, since: int) -> Counter[str]:
    """uvicorn's access-log lines after byte ``since``, by status code."""
    text = log.read_bytes()[since:].decode(errors="replace")
    return Counter(m.group(1) for m in re.finditer(r'HTTP/1\.1" (\d{3})', text))


def fuzz(url: str, key: str, minutes: float, work: Path, label: str) -> dict:
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {key}",
            "--max-time", str(int(minutes * 60)), "--checks", "not_a_server_error", "--continue-on-failure",
            "--request-timeout", "120", "--workers", "2", "--suppress-health-check", "all",
            "--report", "junit", "--report-dir", str(work / f"report-{label}"), "--warnings", "off"]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    (work / f"schemathesis-{label}.log").write_text(out.stdout + out.stderr)
    summary = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|errored)", line)]
    return {"seconds": time.perf_counter() - t0, "exit_code": out.returncode, "summary": summary[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenant-minutes", type=float, default=10)
    ap.add_argument("--admin-minutes", type=float, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loraplex-fuzz"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import httpx

    from tests.integration.server_proc import ServerProcess, create_tenant
    from tests.tiny import make_adapter, make_tiny_llama

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    base = make_tiny_llama(a.work / "base")
    roots = a.work / "loras"
    adapter = make_adapter(base, roots / "a1", seed=1, r=8)
    data = a.work / "data"
    keys = {"admin": create_tenant(data, "admin", "--admin"), "alice": create_tenant(data, "alice", "--rpm", "1000000")}
    log = a.work / "server.log"
    server = ServerProcess(base, data, "--lora-roots", str(roots), "--max-loras", "2", "--max-cpu-loras", "8",
                           log=log).start(600)
    result: dict = {}
    try:
        files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir()) if f.is_file()]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['alice']}"}, timeout=60) as h:
            h.post("/v1/adapters", data={"name": "fuzzed"}, files=files).raise_for_status()
        for label, key, minutes in (("tenant", keys["alice"], a.tenant_minutes),
                                    ("admin", keys["admin"], a.admin_minutes)):
            mark = log.stat().st_size
            run = fuzz(server.url, key, minutes, a.work, label)
            codes = statuses(log, mark)
            run |= {"requests": sum(codes.values()), "by_status": dict(sorted(codes.items())),
                    "server_5xx": sum(v for k, v in codes.items() if k.startswith("5")),
                    "server_500": codes.get("500", 0)}
            result[label] = run
            print(label, json.dumps(run), flush=True)
        result["engine_alive_after"] = httpx.get(f"{server.url}/health").status_code == 200
        result["unhandled_errors_in_log"] = log.read_text(errors="replace").count("unhandled error serving")
    finally:
        server.stop()
    from importlib.metadata import version

    result |= {"schemathesis": version("schemathesis"), "host": platform.node(), "cpus": os.cpu_count(),
               "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
