"""Memory before training: full fine-tuning vs LoRA vs QLoRA for one base.

The classic rule of thumb (16-bit weights 2N bytes, gradients 2N, Adam more)
is where this starts; the numbers below follow what *this* trainer actually
allocates:

- full FT: every parameter in the compute dtype, a gradient of the same dtype,
  and torch AdamW's two moment tensors, which PyTorch keeps in the parameter's
  dtype (so 4 bytes/param of state in bf16, 8 in fp32).
- LoRA: frozen base in the compute dtype; adapter A [r, in] and B [out, r] per
  target in fp32 (PEFT keeps adapters fp32 over a 16-bit base), fp32 grads,
  AdamW states 2 x fp32.
- QLoRA: target linears in NF4 (4 bits + one absmax per 64-weight block; with
  double quant the absmax is 8-bit plus an fp32 scale per 256 blocks); every
  other parameter (embeddings, norms, lm_head) upcast to fp32 by
  prepare_model_for_kbit_training. On CUDA, paged 8-bit AdamW: 2 bytes/param
  of state; on CPU, torch AdamW: 8.
- activations: what autograd saves per decoder layer for a [batch, seq]
  input (see ``activation_bytes``), plus the logits and their fp32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF4_BLOCK = 64  # weights per absmax (bitsandbytes default blocksize for 4-bit)
DQ_BLOCK = 256  # absmaxes per second-level fp32 scale (double quant)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder-layer linear, PEFT names."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (if untied), RMSNorm weights."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return emb + norms

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def adapter_params(self, r: int, targets: list[str]) -> int:
        lin = self.linears()
        return self.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)


@dataclass(frozen=True)
class Breakdown:
    weights: int
    gradients: int
    optimizer: int
    adapter: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.adapter + self.activations


@dataclass(frozen=True)
class Plan:
    shape: Shape
    modes: dict[str, Breakdown]
    compute_dtype: torch.dtype
    device: str

    def mode(self, name: str) -> Breakdown:
        return self.modes[name]

    def table(self) -> str:
        rows = ["weights", "gradients", "optimizer", "adapter", "activations", "total"]
        head = f"{'':14}" + "".join(f"{m:>14}" for m in self.modes)
        lines = [head]
        for r in rows:
            lines.append(f"{r:14}" + "".join(f"{_fmt(getattr(b, r)):>14}" for b in self.modes.values()))
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one tensor of n NF4 weights (ignoring its
    per-tensor constants: the 16-entry NF4 code and 256-entry absmax code, ~1 KiB)."""
    blocks = -(-n // NF4_BLOCK)
    if double_quant:
        return n // 2 + blocks + 4 * -(-blocks // DQ_BLOCK)  # 8-bit absmax + fp32 scale per 256
    return n // 2 + 4 * blocks  # fp32 absmax


def activation_bytes(shape: Shape, *, batch: int, seq: int, elem: int, lora_targets: list[str] | None) -> int:
    """Tensors autograd keeps for backward, per the Llama forward:

    per layer, in elements of [batch*seq, .]: residual in and RMSNorm out (2h),
    q/k/v after RoPE (q + 2kv), attention out (q), second residual and norm (2h),
    gate and up outputs, SiLU(gate) and its product with up (4i); SDPA keeps no
    [seq, seq] score matrix. LoRA adds, per target, its dropout output (in) and
    the A output (r). Final norm (h), logits in the compute dtype and their
    fp32 copy for the loss.
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tokens = batch * seq
    per_layer = 2 * h + (q + 2 * kv) + q + 2 * h + 4 * i
    lora = 0
    if lora_targets:
        lin = shape.linears()
        lora = sum(lin[t][0] for t in lora_targets)
    layers = shape.layers * tokens * (per_layer + lora) * elem
    head = tokens * h * elem + tokens * shape.vocab * (elem + 4)
    return layers + head


def plan(config: dict, *, r: int, targets: list[str], batch_size: int, seq_len: int,
         load_4bit: bool = False, compute_dtype: torch.dtype = torch.float32, device: str = "cpu") -> Plan:
    s = Shape.from_config(config)
    e = torch.finfo(compute_dtype).bits // 8
    n, other = s.params, s.other_params
    a = s.adapter_params(r, targets)
    act_full = activation_bytes(s, batch=batch_size, seq=seq_len, elem=e, lora_targets=None)
    act_lora = activation_bytes(s, batch=batch_size, seq=seq_len, elem=e, lora_targets=targets)
    paged_8bit = device == "cuda"
    modes = {
        "full": Breakdown(weights=n * e, gradients=n * e, optimizer=2 * n * e, adapter=0, activations=act_full),
        "lora": Breakdown(weights=n * e, gradients=4 * a, optimizer=8 * a, adapter=4 * a, activations=act_lora),
        "qlora": Breakdown(weights=s.layers * sum(nf4_bytes(i * o) for i, o in s.linears().values()) + 4 * other, gradients=4 * a,
                           optimizer=(2 if paged_8bit else 8) * a, adapter=4 * a, activations=act_lora),
    }
    return Plan(s, modes, compute_dtype, device)
