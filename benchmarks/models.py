"""Random models for benchmarks, made locally (nothing comes from a hub).

- :func:`make_base` writes a Llama-shaped checkpoint with random bf16 weights and
  a WordLevel tokenizer of the same vocabulary (``w3 w4 ...``): what the GPU runs
  serve as "Llama-3.1-8B-shaped". vLLM's ``load_format=dummy`` would skip the
  write, but bitsandbytes always reads a checkpoint, and the bf16 and 4-bit runs
  should serve the same weights.
- :func:`make_adapters` writes random PEFT LoRA adapters (r=16, every linear)
  for any base. The names and shapes come from PEFT itself, applied to the base
  built on the meta device, so no base weights are read. ``distinct`` bounds how
  many different weight files there are (1000 all-linear r=16 adapters of an 8B
  model would be 84 GB): adapter ``i`` hard-links weight file ``i % distinct``.
  Each adapter is still its own directory, name and LoRA id to the servers, and
  is loaded, cached and evicted on its own.

    python benchmarks/models.py base --shape llama-3.1-8b --out /models/llama8b
    python benchmarks/models.py adapters --base /models/llama8b --n 1000 --distinct 64 --out /adapters
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHAPES = {
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (architecture keys only)
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (untied here, as the 8B)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # a few MB, for tests
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_tokenizer(path: Path, vocab_size: int) -> None:
    """WordLevel over ``<unk> <s> </s> w3 ... w{V-1}``, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=8192)
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def make_base(out: Path, shape: str = "llama-3.1-8b", *, seed: int = 0, shards: int = 4) -> Path:
    """Random bf16 Llama checkpoint + tokenizer + recorded fingerprint; skipped if already there."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from trainer.base import fingerprint

    out = Path(out)
    if (out / "loraplex-base.json").is_file():
        return out
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", **s)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    make_tokenizer(out, s["vocab_size"])
    H, I, V, L, D = (s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"],
                     s["head_dim"])
    q, kv = s["num_attention_heads"] * D, s["num_key_value_heads"] * D
    linears = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
               "self_attn.o_proj": (H, q), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.bfloat16) * 0.02).cpu()

    weight_map, total = {}, 0
    per = -(-L // shards)
    for k in range(shards):
        t = {}
        if k == 0:
            t["model.embed_tokens.weight"] = rnd(V, H)
        for i in range(k * per, min(L, (k + 1) * per)):
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            for m, shp in linears.items():
                t[p + m + ".weight"] = rnd(*shp)
        if k == shards - 1:
            t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            t["lm_head.weight"] = rnd(V, H)
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, out / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(t, name)
        total += sum(v.numel() * v.element_size() for v in t.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    fp = fingerprint(out)  # what the server checks adapters' manifests against
    (out / "loraplex-base.json").write_text(json.dumps({"fingerprint": fp, "shape": shape, "seed": seed}))
    print(f"base {shape}: {total / 2**30:.1f} GiB in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return out


def lora_shapes(base: Path, r: int = 16, targets: list[str] = TARGETS) -> tuple[dict, dict]:
    """PEFT's own saved key names and shapes for this base, and its adapter_config, from a meta model."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=False))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}
    cfg = peft.peft_config["default"].to_dict()
    cfg["base_model_name_or_path"] = str(base)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["inference_mode"] = True
    cfg["task_type"] = "CAUSAL_LM"
    return shapes, cfg


def make_adapters(base: Path, n: int, out: Path, *, r: int = 16, distinct: int | None = None, seed: int = 0,
                  prefix: str = "a") -> list[Path]:
    """``n`` random r=16 all-linear adapters ``out/<prefix>0 ...``; weights cycle over ``distinct`` files."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    dirs = [out / f"{prefix}{i}" for i in range(n)]
    if all((d / "adapter_model.safetensors").exists() for d in dirs):
        return dirs
    t0 = time.perf_counter()
    distinct = min(n, distinct or n)
    shapes, cfg = lora_shapes(base, r)
    pool = out / "_weights"
    pool.mkdir(parents=True, exist_ok=True)
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(seed)
    files = []
    for k in range(distinct):
        f = pool / f"{prefix}{k}.safetensors"
        if not f.exists():
            t = {}
            for key, shp in sorted(shapes.items()):
                x = torch.randn(*shp, generator=g, device=dev, dtype=torch.float32)
                # lora_A ~ N(0, 1/in), lora_B ~ N(0, 1e-4): a small but real change to every layer
                x = x / shp[1] ** 0.5 if "lora_A" in key else x * 0.01
                t[key] = x.to(torch.bfloat16).cpu()
            save_file(t, f, metadata={"format": "pt"})
        files.append(f)
    for i, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        w = d / "adapter_model.safetensors"
        if not w.exists():
            os.link(files[i % distinct], w)
    size = files[0].stat().st_size
    print(f"{n} adapters ({distinct} distinct, {size / 2**20:.1f} MiB each) in {time.perf_counter() - t0:.0f} s "
          f"-> {out}", flush=True)
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    b.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("adapters")
    a.add_argument("--base", type=Path, required=True)
    a.add_argument("--n", type=int, required=True)
    a.add_argument("--distinct", type=int)
    a.add_argument("--prefix", default="a")
    a.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "base":
        make_base(args.out, args.shape)
    else:
        make_adapters(args.base, args.n, args.out, distinct=args.distinct, prefix=args.prefix)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
