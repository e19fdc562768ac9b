"""The training loss: cross-entropy over answer tokens, never over the full logits.

For Llama-3.1-8B, 2 x 2048 tokens of logits are 4,096 x 128,256: 1 GiB in bf16,
2 GiB as the fp32 copy cross-entropy takes, and as much again for their
gradient. Two things remove them:

1. Only positions with a target go through the LM head (prompt tokens and
   padding are out of the loss anyway): their hidden states are gathered
   first, ``[n_targets, h]``.
2. The head and the loss run a chunk of rows at a time and free each chunk's
   logits before the next: on CUDA through Liger's fused linear cross-entropy
   (Triton; it computes the input gradient in the forward), elsewhere a
   chunked PyTorch version whose chunks are recomputed in backward.

Both return the *sum* over target tokens. The fit divides by the optimizer
step's target count, so every answer token weighs the same however the step's
micro-batches split them.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024
"""Rows of logits per chunk on the PyTorch path: 1024 x 128,256 fp32 = 0.5 GiB for Llama-3."""


@cache
def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # [chunk, vocab] in the compute dtype
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, targets[i]); at most one chunk's logits alive at a time."""
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t)
    return total


def answer_token_loss(hidden: torch.Tensor, head: torch.nn.Module, positions: torch.Tensor,
                      targets: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """Summed cross-entropy of ``head`` at ``positions`` (flat indices into hidden's tokens).

    hidden: [batch, seq, h] final hidden states (after the last norm); positions, targets: [n].
    """
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [n, h]
    if getattr(head, "bias", None) is not None:
        return F.cross_entropy(head(rows).float(), targets, reduction="sum")
    if fused and rows.is_cuda and (liger := _liger_loss()) is not None:
        weight = head.weight
        if torch.is_autocast_enabled():  # Liger's kernel is outside autocast: give it one dtype
            dtype = torch.get_autocast_dtype("cuda")
            rows, weight = rows.to(dtype), weight.to(dtype)
        return liger(weight, rows, targets)
    return chunked_linear_cross_entropy(rows, head.weight, targets)
