"""The real vLLM CPU engine on the tiny model, started once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_engine(tiny_base):
    """vllm.LLM (offline engine) with LoRA enabled; the engine core runs in its own process."""
    from vllm import LLM

    llm = LLM(model=str(tiny_base), enable_lora=True, max_lora_rank=16, max_loras=2, max_model_len=512,
              dtype="float32", kv_cache_memory_bytes=128 * 2**20, seed=0, enforce_eager=True)
    yield llm
    del llm


def vllm_greedy(llm, prompts: list[str], lora=None, max_tokens: int = 12) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), lora_request=lora,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
