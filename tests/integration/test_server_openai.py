"""The OpenAI-compatible API through the official `openai` client, against the real server and vLLM."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["the date is march", "hello world convert", "answer iso format 1999"]


@pytest.fixture(scope="module")
def alice(cluster):
    for name, adapter in (("one", "a1"), ("two", "a2")):
        r = cluster.upload("alice", name, adapter)
        assert r.status_code in (201, 409), r.text
    return cluster.client("alice")


def reference_greedy(base, adapter_dir, prompt_ids: list[int], n: int) -> list[int]:
    """PEFT + transformers, fp32 on CPU: the tokens the server must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_models_lists_base_and_own_adapters(alice, cluster):
    ids = {m.id: m for m in alice.models.list().data}
    assert {"tiny", "tiny:one", "tiny:two"} <= set(ids)
    assert ids["tiny:one"].model_extra["parent"] == "tiny"
    assert ids["tiny"].model_extra["parent"] is None
    bob_ids = {m.id for m in cluster.client("bob").models.list().data}
    assert "tiny:one" not in bob_ids and "tiny" in bob_ids


@pytest.mark.parametrize("adapter", [None, "a1", "a2"])
def test_greedy_tokens_equal_peft_reference(alice, cluster, adapter):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cluster.base)
    model = "tiny" if adapter is None else {"a1": "tiny:one", "a2": "tiny:two"}[adapter]
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r = alice.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"return_token_ids": True, "ignore_eos": True})
        want = reference_greedy(cluster.base, cluster.adapters[adapter] if adapter else None, ids, 8)
        assert r.choices[0].model_extra["token_ids"] == want, (model, prompt)
        assert r.model == model


def test_adapter_changes_the_answer(alice):
    kw = dict(messages=[{"role": "user", "content": "month march day 3"}], max_tokens=8, temperature=0)
    base = alice.chat.completions.create(model="tiny", **kw).choices[0].message.content
    one = alice.chat.completions.create(model="tiny:one", **kw).choices[0].message.content
    two = alice.chat.completions.create(model="tiny:two", **kw).choices[0].message.content
    assert len({base, one, two}) == 3


def test_streaming_with_usage(alice):
    stream = alice.chat.completions.create(model="tiny:one", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    assert all(c.model == "tiny:one" for c in chunks)
    full = alice.chat.completions.create(model="tiny:one", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=6, temperature=0)
    assert full.choices[0].message.content == text
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"


def test_sampling_fields(alice):
    r = alice.completions.create(model="tiny", prompt="hello world", max_tokens=5, n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15
    again = alice.completions.create(model="tiny", prompt="hello world", max_tokens=5, n=3, temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded sampling is reproducible
    lp = alice.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)
    chat = alice.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3
    first = alice.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0)
    stop_at = first.choices[0].text[2:4]
    if stop_at.strip():
        stopped = alice.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, stop=[stop_at])
        assert stopped.choices[0].finish_reason == "stop" and stop_at not in stopped.choices[0].text


def test_health_and_ready(cluster):
    with cluster.http() as h:
        assert h.get("/health").json() == {"status": "ok"}
        assert h.get("/ready").json()["status"] == "ready"
