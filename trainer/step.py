"""One forward of a fit: a :class:`~trainer.data.Batch` in, its summed answer-token loss out.

Two layouts of the same batch:

- **padded** ``[rows, width]``: rows right-padded, ``position_ids`` restarting at
  each packed example; transformers builds the block-diagonal causal mask.
- **padding-free** ``[1, n_tokens]`` (CUDA, :data:`trainer.kernels.VARLEN`): every
  real token of the batch in one row, no padding at all, and ``cu_seqlens``
  marking where each example starts, so attention stays inside each example.

Either way the loss is taken only where an example has a next token to
predict (``Batch.targets``), through :func:`trainer.loss.answer_token_loss`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import accumulate

import torch

from trainer.data import IGNORE, Batch
from trainer.loss import answer_token_loss


@dataclass
class Forward:
    backbone: torch.nn.Module
    """The decoder stack that returns the final (normed) hidden states: LlamaModel and kin."""
    head: torch.nn.Module
    """The LM head (``lm_head``)."""
    device: str
    padding_free: bool
    fused_loss: bool
    autocast: torch.dtype | None = None
    """bf16 or fp16 on CUDA: matmuls of fp32 LoRA weights and every op outside the 4-bit kernels run
    in it, as HF Trainer's ``bf16=True`` does. None on CPU (fp32 throughout)."""
    host_embedding: torch.nn.Embedding | None = None
    """The frozen input embedding, kept in host memory (see trainer.kernels.Kernels.embed_on_host)."""

    @classmethod
    def of(cls, model, *, device: str, padding_free: bool, fused_loss: bool,
           autocast: torch.dtype | None) -> "Forward":
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        return cls(causal_lm.get_decoder(), causal_lm.get_output_embeddings(), device, padding_free, fused_loss,
                   autocast)

    def move_embedding_to_host(self) -> int:
        """Keep the input embedding in host memory; returns the device bytes freed (0 if it cannot move)."""
        emb = self.backbone.get_input_embeddings()
        if emb.weight.requires_grad or emb.weight.data_ptr() == self.head.weight.data_ptr():
            return 0  # trained, or tied to the LM head that the loss needs on the device
        freed = emb.weight.numel() * emb.weight.element_size()
        emb.to("cpu")
        self.host_embedding = emb
        return freed

    def _layout(self, batch: Batch) -> tuple[dict, list[int], list[int]]:
        """Model inputs (as CPU lists), and the flat token positions with a target and their targets."""
        if self.padding_free:
            ids, pos, tgt = [], [], []
            for row_ids, row_pos, row_tgt, lens in zip(batch.input_ids, batch.position_ids, batch.targets,
                                                       batch.seq_lens):
                n = sum(lens)
                ids += row_ids[:n]
                pos += row_pos[:n]
                tgt += row_tgt[:n]
            lens = [n for row in batch.seq_lens for n in row]
            inputs = {"input_ids": [ids], "position_ids": [pos], "cu_seq_lens_q": [0, *accumulate(lens)],
                      "max_length_q": max(lens)}
        else:
            inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
            tgt = [t for row in batch.targets for t in row]
        positions = [i for i, t in enumerate(tgt) if t != IGNORE]
        return inputs, positions, [tgt[i] for i in positions]

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens (divide by ``batch.n_targets`` for the mean)."""
        inputs, positions, targets = self._layout(batch)
        dev = self.device
        kwargs: dict = {"position_ids": torch.tensor(inputs["position_ids"]).to(dev, non_blocking=True)}
        ids = torch.tensor(inputs["input_ids"])
        if self.host_embedding is not None:
            with torch.no_grad():
                embeds = self.host_embedding(ids)
            kwargs["inputs_embeds"] = embeds.pin_memory().to(dev, non_blocking=True)
        else:
            kwargs["input_ids"] = ids.to(dev, non_blocking=True)
        if self.padding_free:
            kwargs["cu_seq_lens_q"] = torch.tensor(inputs["cu_seq_lens_q"], dtype=torch.int32).to(dev)
            kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_q"]
            kwargs["max_length_q"] = kwargs["max_length_k"] = inputs["max_length_q"]
        pos_t = torch.tensor(positions).to(dev, non_blocking=True)
        tgt_t = torch.tensor(targets).to(dev, non_blocking=True)
        amp = torch.autocast(dev, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with amp:
            hidden = self.backbone(**kwargs, use_cache=False).last_hidden_state
            return answer_token_loss(hidden, self.head, pos_t, tgt_t, fused=self.fused_loss)


def backward(forward: Forward, group: list[Batch]) -> float:
    """Backpropagate one optimizer step's micro-batches; returns the step's loss per answer token.

    Every answer token of the step weighs the same: each micro-batch's *summed* loss is
    divided by the whole step's target count, so a micro-batch of long answers counts for
    more than one of short answers, exactly as if the step were one batch.
    """
    n_targets = max(1, sum(b.n_targets for b in group))
    total = 0.0
    for batch in group:
        loss = forward.loss_sum(batch)
        (loss / n_targets).backward()
        total += loss.item()
    return total / n_targets
