"""What a cold adapter load costs vLLM's worker: reading the file, then pinning the host copy.

vLLM keeps every adapter of its host tier in pinned (page-locked) memory so it can copy
them to GPU slots asynchronously. Pinning goes through torch's caching host allocator:
memory that an evicted adapter freed is handed to the next one, but a tier that is still
filling needs fresh ``cudaHostAlloc`` calls, which are slow and hold the driver. This times
both cases on one adapter file, the way vLLM loads it (``load_file`` then ``pin_memory``)::

    python benchmarks/pinned_alloc.py /root/bench/adapters/a0/adapter_model.safetensors --n 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="an adapter_model.safetensors")
    p.add_argument("--n", type=int, default=16, help="loads per case")
    a = p.parse_args()

    def load() -> tuple[float, float, list]:
        t0 = time.perf_counter()
        tensors = list(load_file(a.path).values())
        t1 = time.perf_counter()
        pinned = [t.pin_memory() for t in tensors]
        return t1 - t0, time.perf_counter() - t1, pinned

    load()  # CUDA context and page cache, not measured
    held, fresh = [], []
    for _ in range(a.n):  # a filling tier: every load keeps its memory
        read, pin, tensors = load()
        held.append(tensors)
        fresh.append((read, pin))
    recycled = []
    for _ in range(a.n):  # a full tier: each load follows an eviction
        held.pop(0)
        read, pin, tensors = load()
        held.append(tensors)
        recycled.append((read, pin))

    def summary(xs: list[tuple[float, float]]) -> dict:
        return {"read_ms_p50": 1e3 * statistics.median(r for r, _ in xs),
                "pin_ms_p50": 1e3 * statistics.median(p for _, p in xs),
                "pin_ms_max": 1e3 * max(p for _, p in xs)}

    tensors = load_file(a.path)
    print(json.dumps({"file_mib": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20,
                      "tensors": len(tensors), "loads": a.n, "filling_tier": summary(fresh),
                      "after_eviction": summary(recycled), "gpu": torch.cuda.get_device_name()}, indent=1))


if __name__ == "__main__":
    main()
