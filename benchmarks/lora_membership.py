"""CPU time vLLM spends before each step checking which adapters of the batch are loaded.

vLLM's ``LRUCacheWorkerLoRAManager.add_adapter`` runs for every distinct adapter in a step and asks
``id not in self.list_adapters()``, which copies the whole host tier in LRU order. This times that
call as vLLM runs it and as loraplex's patch runs it (``server/engine/vllm_patches.py``), over a
host tier of N adapters held in vLLM's own ``AdapterLRUCache``, for a batch of K distinct ones:

    python benchmarks/lora_membership.py --tier 64 512 790 4096 --batch 32 76
"""

from __future__ import annotations

import argparse
import json
import platform
import time


class HostTier:
    """What ``add_adapter`` calls on vLLM's LoRA model manager, over vLLM's own LRU cache."""

    def __init__(self, n: int):
        from vllm.lora.model_manager import AdapterLRUCache

        self._registered_adapters = AdapterLRUCache(1 << 20, lambda key: None)
        for i in range(1, n + 1):
            self._registered_adapters[i] = object()

    def get_adapter(self, lora_id):
        return self._registered_adapters.get(lora_id)

    def activate_adapter(self, lora_id):
        return True

    def list_adapters(self):  # vLLM's LRUCacheLoRAModelManager.list_adapters
        return dict(self._registered_adapters.cache)


def step_ms(add_adapter, tier: int, batch: int, reps: int) -> float:
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    manager = object.__new__(LRUCacheWorkerLoRAManager)
    manager._adapter_manager = HostTier(tier)
    requests = [LoRARequest(f"a{i}", i, "/unused") for i in range(1, batch + 1)]
    start = time.perf_counter()
    for _ in range(reps):
        for r in requests:
            add_adapter(manager, r)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", type=int, nargs="+", default=[64, 512, 790, 4096])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 76])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import vllm
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from server.engine import vllm_patches

    vllm_vanilla = getattr(LRUCacheWorkerLoRAManager.add_adapter, "__wrapped__", LRUCacheWorkerLoRAManager.add_adapter)
    LRUCacheWorkerLoRAManager.add_adapter = vllm_vanilla
    vllm_patches.patch_lora_membership()
    patched = LRUCacheWorkerLoRAManager.add_adapter
    rows = []
    for tier in a.tier:
        for batch in (b for b in a.batch if b <= tier):
            row = {"host_tier": tier, "distinct_in_step": batch,
                   "vllm_ms_per_step": step_ms(vllm_vanilla, tier, batch, a.reps),
                   "patched_ms_per_step": step_ms(patched, tier, batch, a.reps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"hardware": platform.processor() or platform.machine(), "versions": {"vllm": vllm.__version__},
                       "command": "python benchmarks/lora_membership.py", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
