"""vLLM's multi-LoRA shrink and expand, launched over a work list of the adapters' token blocks.

vLLM 0.25.1 launches its LoRA kernels (``vllm/lora/ops/triton_ops/lora_{shrink,expand}_op.py``)
on a grid of ``cdiv(M, BLOCK_M)`` token blocks *per active adapter*, where M is every token of
the batch; a block past its adapter's own tokens returns at once. In a decode batch of 128
sequences over 64 distinct adapters each adapter holds two tokens, so 7 of 8 blocks are empty,
and their number -- M/BLOCK_M times the adapters -- sets the step time (the tuned H100 kernels
still spent 8.7 ms of LoRA per forward pass on 64 adapters, about five times what reading the
64 adapters costs).

Here the same kernels run over a work list: one entry per (adapter, token block) that holds
tokens. Adapter ``i`` with ``m_i`` tokens has ``cdiv(m_i, BLOCK_M)`` entries, so there are at
most ``cdiv(M, BLOCK_M) + L`` of them for L adapters, against vLLM's ``cdiv(M, BLOCK_M) * L``.
Each block finds its entry from the per-adapter token counts vLLM already keeps
(``LoRAKernelMeta``), with a prefix sum over at most ``max_loras + 1`` counts, so the grid is fixed
by M and L alone and CUDA graphs capture it as they capture vLLM's. The arithmetic per entry,
the block sizes (``get_lora_op_configs``, tuned tables included) and the arguments are vLLM's:
:func:`launcher` stands in for vLLM's kernel object at its one launch site, and the ops, their
custom-op registration and torch.compile see no change.

Triton is imported here, so this module is loaded only where the kernels run: in a CUDA
engine (:func:`server.engine.vllm_patches.patch_lora_worklist`) and in tests under Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _entry(w, M, num_tokens_per_lora, lora_ids, num_loras, BLOCK_M: tl.constexpr, LORA_SLOTS: tl.constexpr):
    """Work-list entry ``w``: (index into lora_ids, first token of the block within that adapter's
    tokens, tokens in the block); index -1 past the last entry. Adapters are in lora_ids' order,
    each with ``cdiv(tokens, BLOCK_M)`` entries, at most vLLM's ``cdiv(M, BLOCK_M)`` (where vLLM
    hands the kernels more tokens than M, as with LoRA'd prompt logits, neither reads past it);
    id -1 (tokens without an adapter) has none."""
    offs = tl.arange(0, LORA_SLOTS)
    live = offs < num_loras
    counts = tl.load(num_tokens_per_lora + offs, mask=live, other=0)
    ids = tl.load(lora_ids + offs, mask=live, other=-1)
    blocks = tl.where(ids != -1, tl.minimum((counts + BLOCK_M - 1) // BLOCK_M, (M + BLOCK_M - 1) // BLOCK_M), 0)
    ends = tl.cumsum(blocks, 0)
    idx = tl.sum((ends <= w).to(tl.int32), 0)
    before = tl.sum(tl.where(offs < idx, blocks, 0), 0)
    mine = tl.sum(tl.where(offs == idx, counts, 0), 0)
    m_off = (w - before) * BLOCK_M
    m_len = tl.minimum(mine - m_off, BLOCK_M)
    return tl.where(w < tl.sum(blocks, 0), idx, -1), m_off, m_len


@triton.jit(do_not_specialize=["num_loras"])
def shrink_kernel(
    input_ptr, lora_ptr, out_ptr, M, N, K,
    token_indices_sorted_by_lora_ids, num_tokens_per_lora, lora_token_start_loc, lora_ids, scaling,
    input_d0_stride, input_d1_stride, lora_d0_stride, lora_d1_stride, lora_d2_stride,
    output_d0_stride, output_d1_stride, output_d2_stride,
    num_loras,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SLICE_NUM: tl.constexpr, LORA_SLOTS: tl.constexpr,
):
    """x[tokens] @ A[adapter].T * scaling into out[slice, tokens, :N] for one work-list entry,
    one N block and one K split (``do_shrink_kernel``'s arithmetic)."""
    pid = tl.program_id(axis=0)
    slice_id = tl.program_id(axis=1)
    pid_sk = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % tl.cdiv(N, BLOCK_N)
    w = (pid // SPLIT_K) // tl.cdiv(N, BLOCK_N)
    lora_idx, m_off, m_len = _entry(w, M, num_tokens_per_lora, lora_ids, num_loras, BLOCK_M, LORA_SLOTS)
    if lora_idx < 0:
        return
    lora_id = tl.load(lora_ids + lora_idx)
    start = tl.load(lora_token_start_loc + lora_idx)
    ram = tl.load(token_indices_sorted_by_lora_ids + start + m_off + tl.arange(0, BLOCK_M) % m_len)

    if SLICE_NUM == 1:
        cur_lora_ptr = lora_ptr
    else:
        cur_lora_ptr = tl.load(lora_ptr + slice_id).to(tl.pointer_type(input_ptr.dtype.element_ty))
    offset_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rbn = tl.max_contiguous(tl.multiple_of(offset_n % N, BLOCK_N), BLOCK_N)
    offset_k = pid_sk * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptr = input_ptr + ram[:, None] * input_d0_stride + offset_k[None, :] * input_d1_stride
    b_ptr = (cur_lora_ptr + lora_d0_stride * lora_id + rbn[None, :] * lora_d1_stride
             + offset_k[:, None] * lora_d2_stride)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        if EVEN_K:
            b = tl.load(b_ptr)
            a = tl.load(a_ptr)
        else:
            in_k = offset_k + k * BLOCK_K * SPLIT_K < K
            b = tl.load(b_ptr, mask=in_k[:, None], other=0.0)
            a = tl.load(a_ptr, mask=in_k[None, :], other=0.0)
        acc += tl.dot(a, b)
        a_ptr += BLOCK_K * SPLIT_K * input_d1_stride
        b_ptr += BLOCK_K * SPLIT_K * lora_d2_stride
    acc *= scaling

    out = out_ptr + slice_id * output_d0_stride
    c_ptr = out + ram[:, None] * output_d1_stride + offset_n[None, :] * output_d2_stride
    c_mask = (tl.arange(0, BLOCK_M)[:, None] < m_len) & (offset_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptr, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptr, acc, mask=c_mask, sem="relaxed")


@triton.jit(do_not_specialize=["num_loras"])
def expand_kernel(
    input_ptr, lora_ptr, out_ptr, M, N, K,
    token_indices_sorted_by_lora_ids, num_tokens_per_lora, lora_token_start_loc, lora_ids, slice_start_loc,
    input_d0_stride, input_d1_stride, input_d2_stride, ls_d0_ptr, ls_d1_ptr, ls_d2_ptr,
    output_d0_stride, output_d1_stride, output_hs_ptr,
    num_loras,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ADD_INPUTS: tl.constexpr, CAST_TYPE: tl.constexpr, SLICE_NUM: tl.constexpr, SAME_STRIDE: tl.constexpr,
    LORA_SLOTS: tl.constexpr,
):
    """inputs[slice, tokens] @ B[adapter].T (+ out) into out[tokens, slice's columns] for one
    work-list entry and one N block (``do_expand_kernel``'s arithmetic; N is the widest slice)."""
    pid = tl.program_id(axis=0)
    slice_id = tl.program_id(axis=1)
    pid_n = pid % tl.cdiv(N, BLOCK_N)
    w = pid // tl.cdiv(N, BLOCK_N)
    curr_n = N if SAME_STRIDE else tl.load(output_hs_ptr + slice_id)
    if pid_n * BLOCK_N >= curr_n:
        return
    lora_idx, m_off, m_len = _entry(w, M, num_tokens_per_lora, lora_ids, num_loras, BLOCK_M, LORA_SLOTS)
    if lora_idx < 0:
        return
    lora_id = tl.load(lora_ids + lora_idx)
    start = tl.load(lora_token_start_loc + lora_idx)
    ram = tl.load(token_indices_sorted_by_lora_ids + start + m_off + tl.arange(0, BLOCK_M) % m_len)

    if SAME_STRIDE:
        d0, d1, d2 = ls_d0_ptr, ls_d1_ptr, ls_d2_ptr
    else:
        d0 = tl.load(ls_d0_ptr + slice_id)
        d1 = tl.load(ls_d1_ptr + slice_id)
        d2 = tl.load(ls_d2_ptr + slice_id)
    if SLICE_NUM == 1:
        cur_input_ptr = input_ptr
        cur_lora_ptr = lora_ptr
        slice_start = slice_start_loc
    else:
        cur_input_ptr = input_ptr + slice_id * input_d0_stride
        cur_lora_ptr = tl.load(lora_ptr + slice_id).to(tl.pointer_type(out_ptr.dtype.element_ty))
        slice_start = tl.load(slice_start_loc + slice_id)
    offset_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rbn = tl.max_contiguous(tl.multiple_of(offset_n % curr_n, BLOCK_N), BLOCK_N)
    offset_k = tl.arange(0, BLOCK_K)
    a_ptr = cur_input_ptr + ram[:, None] * input_d1_stride + offset_k[None, :] * input_d2_stride
    b_ptr = cur_lora_ptr + d0 * lora_id + offset_k[:, None] * d2 + rbn[None, :] * d1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            b = tl.load(b_ptr)
            a = tl.load(a_ptr)
        else:
            in_k = offset_k + k * BLOCK_K < K
            b = tl.load(b_ptr, mask=in_k[:, None], other=0.0)
            a = tl.load(a_ptr, mask=in_k[None, :], other=0.0)
        if CAST_TYPE:
            a = a.to(cur_lora_ptr.dtype.element_ty)
        acc += tl.dot(a, b)
        a_ptr += BLOCK_K * input_d2_stride
        b_ptr += BLOCK_K * d2
    tiled_c = acc.to(cur_lora_ptr.dtype.element_ty)

    offset_cn = offset_n + slice_start
    c_ptr = out_ptr + ram[:, None] * output_d0_stride + offset_cn[None, :] * output_d1_stride
    c_mask = (tl.arange(0, BLOCK_M)[:, None] < m_len) & (offset_cn[None, :] < slice_start + curr_n)
    if ADD_INPUTS:
        tiled_c += tl.load(c_ptr, mask=c_mask)
    tl.store(c_ptr, tiled_c, mask=c_mask)


DROPPED = ("GROUP_SIZE_M", "USE_GDC", "launch_pdl")
"""vLLM's arguments these kernels do without: the swizzle of its (token block, N block) grid,
and programmatic dependent launch, which vLLM uses only with ``VLLM_LORA_ENABLE_DUAL_STREAM``;
the kernels here launch without it, so each still waits for the one before (see :func:`launcher`)."""


def entries(m: int, block_m: int, num_loras: int) -> int:
    """Work-list length for a batch of ``m`` tokens over ``num_loras`` adapter entries: adapter i's
    ``cdiv(m_i, block_m)`` blocks sum to less than ``m / block_m + num_loras``, and no adapter has
    more than ``cdiv(m, block_m)``."""
    per_adapter = triton.cdiv(m, block_m)
    return min(per_adapter * num_loras, per_adapter + num_loras)


def launcher(kernel, vllm_arg_names: list[str], op: str):
    """An object launched as vLLM launches its kernel (``kernel_obj[grid](*args, **options)``)
    that launches ``kernel`` over the work list instead. ``vllm_arg_names`` are vLLM's kernel's
    parameters, by which its positional arguments are passed on by name."""
    own = set(kernel.arg_names)

    class WorklistLaunch:
        def __getitem__(self, grid):
            def launch(*args, **options):
                named = dict(zip(vllm_arg_names, args))
                named.update({k: options.pop(k) for k in list(options) if k in vllm_arg_names})  # launch_pdl too
                num_loras, n_cols = grid[2], named["N"]
                slots = triton.next_power_of_2(named["lora_ids"].numel())
                work = entries(named["M"], named["BLOCK_M"], num_loras)
                if op == "shrink":
                    new_grid = (named["SPLIT_K"] * work * triton.cdiv(n_cols, named["BLOCK_N"]), grid[1], 1)
                else:
                    new_grid = (work * triton.cdiv(n_cols, named["BLOCK_N"]), grid[1], 1)
                args_out = {k: v for k, v in named.items() if k in own}
                return kernel[new_grid](**args_out, num_loras=num_loras, LORA_SLOTS=slots, **options)
            return launch

        def __repr__(self):
            return f"<loraplex work-list launch of vLLM's LoRA {op}>"

    return WorklistLaunch()


def compatible(vllm_arg_names: list[str], kernel) -> bool:
    """Whether vLLM's kernel passes exactly the arguments this one takes (less :data:`DROPPED`,
    plus the two this launch adds): a vLLM that changed its kernels' signature is left alone."""
    ours = set(kernel.arg_names) - {"num_loras", "LORA_SLOTS"}
    return ours == set(vllm_arg_names) - set(DROPPED)
