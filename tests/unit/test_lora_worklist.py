"""The work-list launch of vLLM's LoRA kernels (server/engine/lora_worklist.py): its kernels run by
Triton's interpreter on the CPU against torch (lora_worklist_cases.py, in a process of its own),
the length of its work list, and the patch that installs it at vLLM's launch site."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from server.engine import vllm_patches

pytest.importorskip("triton")
from server.engine import lora_worklist as lw  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# vLLM 0.25.1's kernel parameters, as the patch reads them from its kernels (arg_names)
SHRINK_ARGS = ["input_ptr", "lora_ptr", "out_ptr", "M", "N", "K", "token_indices_sorted_by_lora_ids",
               "num_tokens_per_lora", "lora_token_start_loc", "lora_ids", "scaling", "input_d0_stride",
               "input_d1_stride", "lora_d0_stride", "lora_d1_stride", "lora_d2_stride", "output_d0_stride",
               "output_d1_stride", "output_d2_stride", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EVEN_K", "SPLIT_K",
               "GROUP_SIZE_M", "SLICE_NUM", "USE_GDC", "launch_pdl"]
EXPAND_ARGS = ["input_ptr", "lora_ptr", "out_ptr", "M", "N", "K", "token_indices_sorted_by_lora_ids",
               "num_tokens_per_lora", "lora_token_start_loc", "lora_ids", "slice_start_loc", "input_d0_stride",
               "input_d1_stride", "input_d2_stride", "ls_d0_ptr", "ls_d1_ptr", "ls_d2_ptr", "output_d0_stride",
               "output_d1_stride", "output_hs_ptr", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EVEN_K", "ADD_INPUTS",
               "CAST_TYPE", "SLICE_NUM", "SAME_STRIDE", "USE_GDC", "launch_pdl"]
SLOTS, RANK, K = 8, 16, 64
DT = torch.float16  # the interpreter computes bfloat16 wrongly on the CPU; vLLM takes float16 too


def test_kernels_match_torch_under_the_triton_interpreter():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                          "tests/unit/lora_worklist_cases.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "8 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize("seed", range(20))
def test_the_work_list_holds_every_token_block(seed):
    g = torch.Generator().manual_seed(seed)
    block_m = [16, 32, 64][seed % 3]
    n_adapters = int(torch.randint(1, 129, (1,), generator=g))
    counts = torch.randint(0, 40, (n_adapters,), generator=g).tolist()
    m = sum(counts) + int(torch.randint(0, 50, (1,), generator=g))  # padding and base tokens
    needed = sum(-(-c // block_m) for c in counts)
    assert needed <= lw.entries(m, block_m, n_adapters + 1)  # +1: vLLM's entry for base tokens
    assert lw.entries(m, block_m, n_adapters + 1) <= -(-m // block_m) * (n_adapters + 1)


def test_a_decode_batch_over_many_adapters_launches_a_fraction_of_vllms_blocks():
    # 128 sequences over 64 adapters, 16-token blocks: vLLM 8 x 65, here 8 + 65
    assert lw.entries(128, 16, 65) == 73
    assert lw.entries(128, 16, 1) == 8  # one adapter: the same as vLLM's


def _fake_ops_module(op: str, arg_names: list[str]):
    kernel = types.SimpleNamespace(arg_names=arg_names)
    return types.SimpleNamespace(**{f"_lora_{op}_kernel": kernel}), kernel


@pytest.mark.parametrize("op,args", [("shrink", SHRINK_ARGS), ("expand", EXPAND_ARGS)])
def test_patch_takes_vllms_launch_site_once(op, args, monkeypatch):
    monkeypatch.setenv(vllm_patches.LAUNCH_ENV, "worklist")
    module, original = _fake_ops_module(op, args)
    assert vllm_patches.patch_lora_worklist(op, module)
    launch = getattr(module, f"_lora_{op}_kernel")
    assert launch is not original and launch.original is original
    assert vllm_patches.patch_lora_worklist(op, module)
    assert getattr(module, f"_lora_{op}_kernel") is launch


def test_patch_leaves_a_kernel_with_other_arguments(monkeypatch):
    monkeypatch.setenv(vllm_patches.LAUNCH_ENV, "worklist")
    module, original = _fake_ops_module("shrink", SHRINK_ARGS + ["NEW_ARG"])
    assert not vllm_patches.patch_lora_worklist("shrink", module)
    assert module._lora_shrink_kernel is original


@pytest.mark.parametrize("launch", [None, "vllm"])
def test_vllms_launch_unless_the_work_list_is_asked_for(launch, monkeypatch):
    if launch:
        monkeypatch.setenv(vllm_patches.LAUNCH_ENV, launch)
    else:
        monkeypatch.delenv(vllm_patches.LAUNCH_ENV, raising=False)
    module, original = _fake_ops_module("expand", EXPAND_ARGS)
    assert not vllm_patches.patch_lora_worklist("expand", module)
    assert module._lora_expand_kernel is original
