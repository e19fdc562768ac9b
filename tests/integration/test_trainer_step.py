"""A fit step's forward and backward on the tiny model: the padding-free layout computes what the padded one
does, packed examples never see each other, and micro-batches weigh by answer tokens."""

from __future__ import annotations

import random

import pytest
import torch

from trainer import data
from trainer.kernels import VARLEN, register_varlen
from trainer.model import lora_config
from trainer.step import Forward, backward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(tiny_base, attn: str):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    register_varlen()
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation=attn)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(r=8, alpha=16, dropout=0.0, targets=TARGETS))
    with torch.no_grad():  # B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


@pytest.fixture(scope="module")
def examples(tiny_base, tiny_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    return data.load(tiny_data, tok, max_seq_len=128, eval_split=0.0, seed=0).train[:12]


def loss_and_grads(model, forward, batch):
    model.zero_grad(set_to_none=True)
    loss = forward.loss_sum(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_padding_free_varlen_equals_the_padded_block_diagonal_mask(tiny_base, examples):
    [batch, *_] = data.batches(examples, batch_size=2, max_seq_len=64, packing=True, pad_id=0, rng=random.Random(0))
    assert len(batch.seq_lens[0]) > 1  # packed rows: the padded layout needs its block-diagonal mask
    padded_model, flat_model = peft_model(tiny_base, "sdpa"), peft_model(tiny_base, VARLEN)
    padded = loss_and_grads(padded_model, Forward.of(padded_model, device="cpu", padding_free=False,
                                                     fused_loss=True, autocast=None), batch)
    flat = loss_and_grads(flat_model, Forward.of(flat_model, device="cpu", padding_free=True,
                                                 fused_loss=True, autocast=None), batch)
    assert torch.allclose(flat[0], padded[0], rtol=1e-5)
    for name, g in padded[1].items():
        err = ((flat[1][name] - g).norm() / g.norm()).item()
        assert err < 1e-5, (name, err)


def test_packed_examples_do_not_see_each_other(tiny_base, examples):
    """A packed row's loss is the sum of each example's loss computed alone."""
    model = peft_model(tiny_base, VARLEN)
    forward = Forward.of(model, device="cpu", padding_free=True, fused_loss=True, autocast=None)
    [packed] = data.batches(examples[:4], batch_size=1, max_seq_len=512, packing=True, pad_id=0,
                            rng=random.Random(0))
    alone = data.batches(examples[:4], batch_size=1, max_seq_len=512, packing=False, pad_id=0, rng=random.Random(0))
    with torch.no_grad():
        together = forward.loss_sum(packed)
        separately = sum(forward.loss_sum(b) for b in alone)
    assert torch.allclose(together, separately, rtol=1e-5)


def test_micro_batches_weigh_by_answer_tokens(tiny_base, examples):
    """One step of 4 rows and the same step as 2 micro-batches of 2 rows: the same loss and gradient."""
    model = peft_model(tiny_base, "sdpa")
    forward = Forward.of(model, device="cpu", padding_free=False, fused_loss=True, autocast=None)
    short = [data.Example(e.input_ids, [data.IGNORE] * (len(e.labels) - 2) + e.labels[-2:]) for e in examples[:2]]
    rows = short + examples[2:4]
    assert short[0].n_target < examples[2].n_target  # unequal micro-batches: a mean of means would differ

    def batch(exs):
        return next(data.batches(exs, batch_size=len(exs), max_seq_len=128, packing=False, pad_id=0,
                                 rng=random.Random(0)))

    grads = []
    for group in ([batch(rows)], [batch(rows[:2]), batch(rows[2:])]):
        model.zero_grad(set_to_none=True)
        loss = backward(forward, group)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (one, g1), (two, g2) = grads
    assert one == pytest.approx(two, rel=1e-5)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-7), name


def test_lora_epilogue_computes_what_peft_does(tiny_base, examples):
    from trainer.kernels import apply_lora_epilogue

    [batch] = data.batches(examples[:3], batch_size=3, max_seq_len=128, packing=False, pad_id=0,
                           rng=random.Random(0))
    peft, fused = peft_model(tiny_base, "sdpa"), peft_model(tiny_base, "sdpa")
    assert apply_lora_epilogue(fused) == 2 * 7
    want = loss_and_grads(peft, Forward.of(peft, device="cpu", padding_free=False, fused_loss=True, autocast=None), batch)
    got = loss_and_grads(fused, Forward.of(fused, device="cpu", padding_free=False, fused_loss=True, autocast=None),
                         batch)
    assert torch.allclose(got[0], want[0], rtol=1e-5)
    for name, g in want[1].items():
        assert ((got[1][name] - g).norm() / g.norm()).item() < 1e-5, name
