"""A tiny random Llama with a byte-level BPE tokenizer and a chat template, made in code.

Nothing is downloaded: the tokenizer is trained in-process on generated text and
the weights are random (seeded). 2 layers, hidden 128, head_dim 64 (vLLM's CPU
attention needs a standard head size).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int = 2000) -> list[str]:
    rng = random.Random(0)
    words = ("the date is month day year convert answer iso format user assistant system hello world "
             "january february march april may june july august september october november december").split()
    return [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}"
            for _ in range(n)]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger init than default so that a random model's outputs vary with input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def make_dataset(path: Path, n: int = 48, *, fmt: str = "chat", seed: int = 0) -> Path:
    """A trivially learnable task: answer with a fixed word keyed on the month."""
    rng = random.Random(seed)
    months = ["january", "march", "june", "october"]
    rows = []
    for _ in range(n):
        m = rng.choice(months)
        q, a = f"month {m} day {rng.randint(1, 28)}", f"answer {months.index(m) + 1}"
        if fmt == "chat":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif fmt == "alpaca":
            rows.append({"instruction": "convert", "input": q, "output": a})
        elif fmt == "completion":
            rows.append({"prompt": q + " =", "completion": " " + a})
        else:
            rows.append({"text": f"{q} = {a}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_adapter(base: Path, out: Path, *, r: int = 8, seed: int = 1, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                 "gate_proj", "up_proj", "down_proj"), scale: float = 0.5, **config) -> Path:
    """A random (untrained) PEFT LoRA whose output differs visibly from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **config)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, scale / r ** 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
