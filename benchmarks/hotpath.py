"""The server's per-request overhead: API-process CPU seconds per request, and where they go.

Starts ``python -m server`` from one or more source trees (say, the commit
before a change and the working tree), each on its own port and data dir, with
a tenant and one random r=16 adapter. Then, in rounds, drives each in turn with
the same short closed-loop workload (benchmarks/loadgen.py) and reads the API
server process's own CPU time (utime + stime from /proc/<pid>/stat, children
excluded: vLLM's EngineCore is a child) before and after a fixed number of
requests. On a shared 2-core host wall-clock figures are noisy; CPU seconds per
request of the API process are not, and they are what the hot path costs.

With ``--profile``, each server is also sampled with py-spy for one more batch,
and the top frames (self and total) are written as text.

    .venv/bin/python benchmarks/hotpath.py --tree before=/tmp/hp-before --tree after=. \\
        --rounds 3 --requests 200 --profile --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Workload, run as load  # noqa: E402

KINDS = ("completions:ids:stream", "completions:text", "chat:stream", "chat")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself (all its threads), not of its children."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


def make_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """One random r=16 all-linear PEFT adapter for the base (kept in ``out`` for the next run)."""
    if (out / "adapter_model.safetensors").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(out, safe_serialization=True)
    return out


class Server:
    def __init__(self, name: str, tree: Path, port: int, adapter: Path, log_dir: Path, extra: list[str]):
        self.name, self.tree, self.port = name, tree.resolve(), port
        self.data = Path(tempfile.mkdtemp(prefix=f"hp-{name}-"))
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        out = subprocess.run([sys.executable, "-m", "server", "tenants", "create", "hp", "--rpm", "10000000",
                              "--data-dir", str(self.data)], cwd=self.tree, env=env, capture_output=True,
                             text=True, check=True)
        self.key = out.stdout.strip().splitlines()[-1]
        self.log_path = log_dir / f"hotpath-server-{name}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(self.data), *extra],
            cwd=self.tree, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir()) if f.is_file()]
        r = httpx.post(f"{self.url}/v1/adapters", data={"name": "a0"}, files=files,
                       headers={"Authorization": f"Bearer {self.key}"}, timeout=300)
        r.raise_for_status()

    def _wait_ready(self) -> None:
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server {self.name} not ready; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def workload(a, requests: int, seed: int) -> Workload:
    return Workload(models=("smollm2-135m", "smollm2-135m:a0"), alpha=None, concurrency=a.concurrency,
                    input_len=(a.input_len, a.input_len), output_len=(a.output_len, a.output_len),
                    vocab=49000, seed=seed, kinds=tuple(a.kinds), requests=requests)


def measure(s: Server, a, seed: int) -> dict:
    # The API process also burns CPU when idle (vLLM's engine monitor and stat
    # logger); measure that rate first and charge the load window with it.
    t, c = time.perf_counter(), cpu_seconds(s.proc.pid)
    time.sleep(a.idle)
    idle_rate = (cpu_seconds(s.proc.pid) - c) / (time.perf_counter() - t)
    before = cpu_seconds(s.proc.pid)
    summary, _ = load(f"{s.url}/v1", s.key, workload(a, a.requests, seed))
    cpu = cpu_seconds(s.proc.pid) - before
    if summary.errors:
        raise RuntimeError(f"{s.name}: {summary.errors} errors: {summary.error_samples}")
    net = cpu - idle_rate * summary.duration_s
    return {"tree": s.name, "requests": summary.requests, "cpu_s": round(cpu, 3),
            "idle_cpu_ms_per_s": round(1000 * idle_rate, 2),
            "cpu_ms_per_request": round(1000 * cpu / summary.requests, 3),
            "net_cpu_ms_per_request": round(1000 * net / summary.requests, 3),
            "requests_per_s": round(summary.requests_per_s, 3), "ttft_p50_ms": round(1000 * summary.ttft_s["p50"], 1),
            "e2e_p50_ms": round(1000 * summary.e2e_s["p50"], 1)}


def profile(s: Server, a, out: Path) -> Path:
    raw = out / f"hotpath-{s.name}.raw"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(s.proc.pid),
                            "--rate", "500", "--format", "raw", "--function", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # attached
    load(f"{s.url}/v1", s.key, workload(a, a.requests, seed=99))
    spy.send_signal(signal.SIGINT)
    spy.wait(60)
    return raw


def _frame(f: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py)`` -> ``func (pkg/mod.py)``."""
    name, _, path = f.rpartition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path.startswith("/tmp/"):  # another source tree of this repo
        path = "/".join(path.split("/")[3:])
    return f"{name} ({path})"


def _package(frame: str) -> str:
    path = frame.rpartition(" (")[2].rstrip(")")
    top = path.split("/", 1)[0]
    return path.rsplit("/", 1)[0] if top in ("server", "benchmarks") else top.removesuffix(".py")


# Leaf frames of threads blocked in a system call: py-spy's idle detection
# does not catch them all (anyio's and vLLM's worker threads waiting for work).
WAITS = {"Condition.wait", "_worker", "_PollLikeSelector.select", "EpollSelector.select", "Queue.get", "wait",
         "Event.wait", "Thread.join", "sleep"}


def summarize(raw: Path, top: int = 30) -> str:
    """Top frames by self and total samples, and self samples by package, from py-spy's raw (collapsed) output."""
    self_, total, pkg = Counter(), Counter(), Counter()
    n = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if not frames:
            continue
        if frames[-1].partition(" (")[0] in WAITS:
            idle += c
            continue
        n += c
        self_[frames[-1]] += c
        pkg[_package(frames[-1])] += c
        for f in set(frames):
            total[f] += c
    lines = [f"{n} busy samples of the API server process (py-spy --rate 500 --function; {idle} more samples "
             "of threads blocked waiting, dropped)", "",
             "self samples by package:"]
    lines += [f"  {100 * c / n:5.1f}%  {p}" for p, c in pkg.most_common(15)]
    lines += ["", f"top {top} frames by self samples:"]
    lines += [f"  {100 * c / n:5.1f}%  {f}" for f, c in self_.most_common(top)]
    lines += ["", f"top {top} frames by total samples (self + callees):"]
    lines += [f"  {100 * c / n:5.1f}%  {f}" for f, c in total.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                   help="a source tree of this repo to run the server from (repeat to compare)")
    p.add_argument("--port", type=int, default=8011, help="first port; one per tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200, help="per tree per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--idle", type=float, default=10, help="seconds of idle CPU measured before each batch")
    p.add_argument("--profile", action="store_true", help="also sample each server with py-spy")
    p.add_argument("--server-args", default="--enforce-eager --max-model-len 512")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    from trainer.base import resolve

    adapter = make_adapter(resolve("smollm2-135m").path, Path(tempfile.gettempdir()) / "hp-adapters" / "a0")
    servers: list[Server] = []
    try:
        for i, spec in enumerate(a.tree):
            name, _, tree = spec.partition("=")
            print(f"starting {name} from {tree} on :{a.port + i}", flush=True)
            servers.append(Server(name, Path(tree), a.port + i, adapter, Path(tempfile.gettempdir()),
                                  a.server_args.split()))
        for s in servers:  # warm up: adapter load, first-request paths, allocator
            load(f"{s.url}/v1", s.key, workload(a, 2 * a.concurrency, seed=1234))
        rows = []
        for r in range(a.rounds):
            for s in servers if r % 2 == 0 else servers[::-1]:  # ABBA: drift hits both alike
                row = {"round": r, **measure(s, a, seed=r)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if a.profile:
            for s in servers:
                raw = profile(s, a, a.out)
                text = summarize(raw)
                (a.out / f"hotpath-{s.name}.txt").write_text(text)
                raw.unlink()
                print(f"--- {s.name}\n{text}", flush=True)
    finally:
        for s in servers:
            s.stop()

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    table = {}
    for s in servers:
        mine = [r for r in rows if r["tree"] == s.name]
        table[s.name] = {k: round(median([r[k] for r in mine]), 3)
                         for k in ("cpu_ms_per_request", "net_cpu_ms_per_request", "idle_cpu_ms_per_s", "requests_per_s", "ttft_p50_ms", "e2e_p50_ms")}
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "workload": asdict(workload(a, a.requests, 0)),
              "rounds": rows, "medians": table}
    (a.out / "hotpath.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
