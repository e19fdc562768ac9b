"""The work-list launch of vLLM's LoRA kernels on a real GPU (run on a GPU host: pytest -m gpu):
the engine's own check keeps it where it gives vLLM's answer, and puts vLLM's launch back where
it does not."""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from vllm.config.lora import LoRAConfig  # noqa: E402

from server.engine import lora_worklist, vllm_patches  # noqa: E402

OPS = ("shrink", "expand")


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setenv(vllm_patches.LAUNCH_ENV, "worklist")
    mods = {op: importlib.import_module(f"vllm.lora.ops.triton_ops.lora_{op}_op") for op in OPS}
    originals = {op: getattr(mod, f"_lora_{op}_kernel") for op, mod in mods.items()}
    for op, mod in mods.items():
        assert vllm_patches.patch_lora_worklist(op, mod)
    yield mods
    for op, mod in mods.items():
        setattr(mod, f"_lora_{op}_kernel", getattr(originals[op], "original", originals[op]))


@pytest.mark.parametrize("slots,specialize", [(128, True), (8, False)])
def test_the_work_list_gives_vllms_answer_here_and_stays(patched, slots, specialize):
    config = LoRAConfig(max_loras=slots, max_lora_rank=16, specialize_active_lora=specialize)
    assert vllm_patches.verify_lora_worklist(config, torch.bfloat16)
    assert all(getattr(mod, f"_lora_{op}_kernel").__loraplex_patched__ for op, mod in patched.items())


def test_a_work_list_that_computes_something_else_is_taken_out(patched, monkeypatch):
    # the work list that drops every adapter's last token block: the check must notice
    monkeypatch.setattr(lora_worklist, "entries", lambda m, block_m, num_loras: 1)
    assert not vllm_patches.verify_lora_worklist(LoRAConfig(max_loras=8, max_lora_rank=16), torch.bfloat16)
    for op, mod in patched.items():
        assert not getattr(getattr(mod, f"_lora_{op}_kernel"), "__loraplex_patched__", False)
