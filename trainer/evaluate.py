"""Held-out evaluation: loss, perplexity and task exact-match, base vs base+adapter.

Exact match compares the greedy completion (stripped) with the reference
assistant answer / completion. The prompt is rendered with the base's chat
template exactly as the server renders /v1/chat/completions.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import base as base_mod
from trainer import data as data_mod

logger = logging.getLogger(__name__)


@dataclass
class Report:
    label: str
    loss: float
    perplexity: float
    exact_match: float
    n: int
    samples: list[tuple[str, str, str]]  # (prompt tail, expected, got)

    def row(self) -> str:
        return f"{self.label:28} loss {self.loss:7.4f}  ppl {self.perplexity:9.3f}  exact-match {100 * self.exact_match:5.1f}%  (n={self.n})"


def prompts_and_answers(path: Path, tokenizer, limit: int | None) -> tuple[list[list[int]], list[str], list[dict]]:
    fmt, rows = data_mod.read_rows(path)
    if fmt == "text":
        raise data_mod.DataError(f"{path}: 'text' records have no answer to exact-match against")
    prompts, answers, kept = [], [], []
    for lineno, row in rows[:limit]:
        if fmt == "completion":
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = row["completion"]
        else:
            messages = data_mod.to_messages(row, fmt, path, lineno)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answer = messages[last]["content"]
        prompts.append(ids)
        answers.append(answer.strip())
        kept.append(row)
    return prompts, answers, kept


@torch.no_grad()
def greedy(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
           batch_size: int = 32) -> list[list[int]]:
    """Left-padded batched greedy decoding."""
    outs = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        outs += [g[width:].tolist() for g in gen]
    return outs


def evaluate(model, tokenizer, path: Path, *, label: str, limit: int | None, max_seq_len: int,
             max_new_tokens: int = 16) -> Report:
    from trainer.fit import eval_loss
    from trainer.step import Forward

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device.type
    ds = data_mod.load(path, tokenizer, max_seq_len=max_seq_len, eval_split=0.0, seed=0)
    # The fit's own loss (answer tokens, logits in fp32), on any device: eval on CUDA and on CPU agree.
    forward = Forward.of(model, device=device, padding_free=False, fused_loss=False, autocast=None)
    loss = eval_loss(forward, model, ds.train[:limit], batch_size=16, max_seq_len=max_seq_len, pad_id=pad)
    prompts, answers, _ = prompts_and_answers(path, tokenizer, limit)
    gens = greedy(model, prompts, pad_id=pad, eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens)
    got = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
    hits = [g == a for g, a in zip(got, answers)]
    samples = [(tokenizer.decode(p[-12:]), a, g) for p, a, g in list(zip(prompts, answers, got))[:3]]
    return Report(label, loss, math.exp(loss), sum(hits) / len(hits), len(hits), samples)


def load_for_eval(base: base_mod.BaseModel, *, load_4bit: bool):
    from trainer.model import choose_precision, load_base

    model = load_base(base, choose_precision(load_4bit))
    model.eval()
    return model


def read_manifest(adapter: Path) -> dict | None:
    f = adapter / "loraplex.json"
    return json.loads(f.read_text()) if f.is_file() else None
