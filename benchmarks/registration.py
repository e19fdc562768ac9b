"""Registration's own cost, without an engine: N adapters through /v1/load_lora_adapter's path.

A real AdapterService (SQLite registry, local store, tenants, residency) registers N copies of
a tiny model's adapters (``--distinct`` different weight files) from ``--clients`` concurrent
callers; the engine is a stand-in whose add_lora returns at once, so what is timed is loraplex's
work per registration (copy, hash, rules, registry, snapshot) and how it grows with N. The GPU
run (``gpu_run.sh many loraplex``) times the same path with vLLM's validation loads and 80 MiB
adapters.

    python benchmarks/registration.py --n 1000 --clients 8
    python benchmarks/registration.py --shape llama-3.1-8b --n 200 --distinct 16   # 80 MiB adapters
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class InstantEngine:
    """vLLM's add_lora/remove_lora, answered at once."""

    ready = True

    async def add_lora(self, name, lora_id, path):
        pass

    async def remove_lora(self, lora_id):
        pass


def config_only_base(out: Path, shape: str) -> Path:
    """A base's config and fingerprint without its weights: registration reads only the config,
    so the 8B shape's 80 MiB adapters need no 16 GB base here."""
    from transformers import LlamaConfig

    from benchmarks.models import SHAPES

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    (out / "loraplex-base.json").write_text('{"fingerprint": "config-only"}')
    return out


def build(work: Path, n: int, distinct: int, clients: int, shape: str = "tiny"):
    import json

    from benchmarks.models import make_adapters, make_base
    from server.adapters.registry import AdapterRegistry
    from server.adapters.store import AdapterStore
    from server.adapters.upload import BaseSpec
    from server.config import Settings
    from server.db import Database
    from server.metrics import Metrics
    from server.service import Service
    from server.tenants import Role, TenantStore
    from server.tenants.store import Quotas
    from trainer.base import resolve

    base = make_base(work / "base", "tiny") if shape == "tiny" else config_only_base(work / "base", shape)
    pool = work / "loras"
    make_adapters(base, n, pool, distinct=distinct)
    config = resolve(base).config if shape == "tiny" else json.loads((base / "config.json").read_text())
    spec = BaseSpec.from_config(shape, config, json.loads((base / "loraplex-base.json").read_text())["fingerprint"])
    db = Database(work / "registry.sqlite3")
    settings = Settings(data_dir=work / "data", max_model_len=256, lora_roots=[pool], max_uploads=clients,
                        max_uploads_per_tenant=clients, max_cpu_loras=n, adapter_cache_bytes=1 << 40)
    service = Service(settings, base=None, base_spec=spec, engine=InstantEngine(), tokenizer=None,
                      tenants=TenantStore(db), registry=AdapterRegistry(db),
                      store=AdapterStore(work / "data" / "adapters"), metrics=Metrics())
    key = service.tenants.create("bench", Role.ADMIN, Quotas(max_adapters=n))
    return service, key, pool


async def register(service, key: str, pool: Path, n: int, clients: int) -> dict:
    admin = await service.authenticate(f"Bearer {key}")
    todo = list(range(n))
    took: list[float] = []

    async def client():
        while todo:
            i = todo.pop(0)
            t = time.perf_counter()
            await service.adapters.load_from_path(admin, f"a{i}", str(pool / f"a{i}"))
            took.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    total = time.perf_counter() - t0
    tenth = max(n // 10, 1)
    return {"adapters": n, "clients": clients, "seconds": round(total, 2),
            "first_tenth_mean_ms": round(statistics.mean(took[:tenth]) * 1000, 1),
            "last_tenth_mean_ms": round(statistics.mean(took[-tenth:]) * 1000, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=64, help="different weight files among the N adapters")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--work", default=None, help="where the adapters and the store go (default: the system's temp dir)")
    p.add_argument("--shape", default="tiny", help="benchmarks/models.py SHAPES; llama-3.1-8b: 80 MiB adapters")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.work) as d:
        service, key, pool = build(Path(d), a.n, a.distinct, a.clients, a.shape)
        print(asyncio.run(register(service, key, pool, a.n, a.clients)))


if __name__ == "__main__":
    main()
