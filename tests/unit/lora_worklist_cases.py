"""Cases for tests/unit/test_lora_worklist.py, run in a process of their own with
``TRITON_INTERPRET=1`` set before Triton is imported (Triton fixes the interpreter in when it first
loads ``triton.language``): the work-list kernels, interpreted on the CPU, against the same product
in torch, on metadata from vLLM's own LoRAKernelMeta. Not collected by the suite's own run."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/unit/test_lora_worklist.py"
from server.engine import lora_worklist as lw_module  # noqa: E402
from tests.unit.test_lora_worklist import DT, EXPAND_ARGS, K, RANK, SHRINK_ARGS, SLOTS  # noqa: E402
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta  # noqa: E402


@pytest.fixture
def lw():
    return lw_module


def batch(counts: dict[int, int], base_tokens: int, slots: int = SLOTS):
    """A shuffled batch with ``counts[slot]`` tokens of each adapter slot and ``base_tokens`` of
    none, and vLLM's kernel metadata for it, specialized to the active count as the engine runs."""
    mapping = torch.tensor([s for s, n in counts.items() for _ in range(n)] + [-1] * base_tokens, dtype=torch.int32)
    mapping = mapping[torch.randperm(len(mapping))]
    meta = LoRAKernelMeta.make(slots, 256, "cpu")
    meta.prepare_tensors(mapping)
    return mapping, meta.meta_args(len(mapping), True)


def shrink(lw, x, weights, meta, *, block_m, split_k, scaling=0.5):
    _, sorted_idx, per_lora, starts, ids, _, active = meta
    m = x.shape[0]
    out = torch.zeros(len(weights), m, RANK, dtype=torch.float32)
    ptrs = torch.tensor([w.data_ptr() for w in weights], dtype=torch.uint64) if len(weights) > 1 else weights[0]
    block_k = 32
    launch = lw.launcher(lw.shrink_kernel, SHRINK_ARGS, "shrink")
    launch[(0, len(weights), int(active))](
        x, ptrs, out, m, RANK, K, sorted_idx, per_lora, starts, ids, scaling, x.stride(0), x.stride(1),
        *weights[0].stride(), *out.stride(), block_m, 16, block_k, K % (block_k * split_k) == 0, split_k, 8,
        len(weights), False, num_warps=4, num_ctas=1, num_stages=2, launch_pdl=False)
    return out


def expand(lw, inputs, weights, out, meta, *, offset=0, add=True, block_m=16):
    _, sorted_idx, per_lora, starts, ids, _, active = meta
    widths = [w.shape[1] for w in weights]
    first = [offset + sum(widths[:i]) for i in range(len(widths))]
    if len(weights) > 1:
        ptrs, slice_start = (torch.tensor([w.data_ptr() for w in weights], dtype=torch.uint64),
                             torch.tensor(first, dtype=torch.uint64))
    else:
        ptrs, slice_start = weights[0][0], first[0]
    same = len(set(widths)) == 1
    if same:
        d0, d1, d2, hs = *weights[0].stride(), widths[0]
    else:
        d0, d1, d2 = (torch.tensor([w.stride(i) for w in weights]) for i in range(3))
        hs = torch.tensor(widths)
    launch = lw.launcher(lw.expand_kernel, EXPAND_ARGS, "expand")
    launch[(0, len(weights), int(active))](
        inputs, ptrs, out, inputs.shape[1], max(widths), RANK, sorted_idx, per_lora, starts, ids, slice_start,
        *inputs.stride(), d0, d1, d2, *out.stride(), hs, block_m, 32, 16, True, add, True, len(weights), same,
        False, num_warps=4, num_ctas=1, num_stages=2, launch_pdl=False)
    return first


@pytest.mark.parametrize("split_k", [1, 2])
def test_shrink_matches_torch_for_every_token_of_every_adapter(lw, split_k):
    torch.manual_seed(split_k)
    # slot 2 spans three token blocks, slot 5 one token; base tokens stay untouched
    mapping, meta = batch({0: 3, 2: 40, 5: 1, 7: 17}, base_tokens=5)
    x = torch.randn(len(mapping), K, dtype=DT)
    weights = [torch.randn(SLOTS, RANK, K, dtype=DT) for _ in range(3)]
    out = shrink(lw, x, weights, meta, block_m=16, split_k=split_k)
    want = torch.zeros_like(out)
    for s, w in enumerate(weights):
        for t, slot in enumerate(mapping.tolist()):
            if slot >= 0:
                want[s, t] = x[t].float() @ w[slot].float().T * 0.5
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("widths,offset,add", [((48, 16, 16), 0, True), ((32, 32), 0, True),
                                               ((40,), 5, True), ((40,), 5, False)])
def test_expand_matches_torch_and_leaves_other_rows_and_columns(lw, widths, offset, add):
    torch.manual_seed(len(widths) + offset)
    mapping, meta = batch({1: 2, 3: 19, 6: 1}, base_tokens=4)
    m = len(mapping)
    inputs = torch.randn(len(widths), m, RANK, dtype=torch.float32)
    weights = [torch.randn(SLOTS, n, RANK, dtype=DT) for n in widths]
    out = torch.randn(m, offset + sum(widths) + 3, dtype=DT)
    before = out.clone().float()
    first = expand(lw, inputs, weights, out, meta, offset=offset, add=add)
    want = before.clone()
    for s, (w, n) in enumerate(zip(weights, widths)):
        for t, slot in enumerate(mapping.tolist()):
            if slot >= 0:
                cols = slice(first[s], first[s] + n)
                want[t, cols] = (want[t, cols] if add else 0) + inputs[s, t] @ w[slot].float().T
    torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-2)


def test_one_adapter_with_the_whole_batch_and_a_batch_without_adapters(lw):
    mapping, meta = batch({4: 64}, base_tokens=0)
    x = torch.randn(64, K, dtype=DT)
    weights = [torch.randn(SLOTS, RANK, K, dtype=DT)]
    out = shrink(lw, x, weights, meta, block_m=16, split_k=1)
    torch.testing.assert_close(out[0], x.float() @ weights[0][4].float().T * 0.5, rtol=1e-3, atol=1e-3)
    mapping, meta = batch({}, base_tokens=9)
    assert meta[5].item(), "vLLM skips the kernels for a batch without adapters"




def test_no_adapter_reads_past_the_blocks_vllm_gives_it(lw):
    # vLLM can hand the kernels more tokens than M (LoRA'd prompt logits): like vLLM's own launch,
    # each adapter then gets at most cdiv(M, BLOCK_M) token blocks, and nothing past them is written
    torch.manual_seed(3)
    mapping, meta = batch({2: 40, 5: 1}, base_tokens=3)
    x = torch.randn(len(mapping), K, dtype=DT)
    weight = torch.randn(SLOTS, RANK, K, dtype=DT)
    _, sorted_idx, per_lora, starts, ids, _, active = meta
    out = torch.zeros(1, len(mapping), RANK, dtype=torch.float32)
    launch = lw.launcher(lw.shrink_kernel, SHRINK_ARGS, "shrink")
    launch[(0, 1, int(active))](
        x, weight, out, 16, RANK, K, sorted_idx, per_lora, starts, ids, 1.0, x.stride(0), x.stride(1),
        *weight.stride(), *out.stride(), 16, 16, 32, True, 1, 8, 1, False, num_warps=4, num_ctas=1,
        num_stages=2, launch_pdl=False)
    want = torch.zeros_like(out)
    for i in range(int(active)):
        if ids[i] >= 0:  # vLLM's launch: the first BLOCK_M (= M here) of each adapter's tokens
            rows = sorted_idx[starts[i]:starts[i] + min(int(per_lora[i]), 16)].long()
            want[0, rows] = x[rows].float() @ weight[int(ids[i])].float().T
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
