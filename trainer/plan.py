"""Memory before training: full fine-tuning vs LoRA vs QLoRA for one base.

The numbers follow what *this* trainer allocates, term by term (``trainer plan``
prints them; the README explains each):

- **weights**: every parameter in the compute dtype (bf16 on CUDA, fp32 on CPU);
  with --4bit the target linears in NF4 (4 bits, plus an 8-bit absmax per 64
  weights and an fp32 scale per 256 absmaxes). Nothing is upcast to fp32. On
  CUDA a frozen, untied input embedding stays in host memory
  (``embedding_on_host``) and is not counted.
- **adapter**: LoRA's A [r, in] and B [out, r] per target in fp32 (PEFT keeps
  adapters fp32), plus their bf16 copies under autocast on CUDA.
- **gradients**: fp32, one per adapter weight.
- **optimizer**: torch AdamW, two fp32 moments (8 bytes/param); QLoRA on CUDA
  uses paged 8-bit AdamW (2 bytes/param, in CUDA managed memory).
- **activations**: what autograd keeps for backward (see :func:`activation_bytes`):
  every layer's activations without checkpointing; with it, each layer's
  input (none on the device when offloaded) plus one layer's recomputed
  activations at a time; and the loss, which sees only answer tokens' rows.
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
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (if untied), RMSNorm weights."""
        emb = self.embedding_params * (1 if self.tied else 2)
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
    checkpointing: str
    embedding_on_host: bool

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


def layer_values(shape: Shape, *, fused: bool) -> int:
    """Values per token that autograd keeps for one decoder layer's backward (LoRA on every linear,
    no LoRA dropout, so each LoRA A reads the tensor its base linear already read):

    RMSNorm input and output (2h), the attention's q, k, v and output (2q + 2kv), the
    second norm's input and output (2h), and the MLP's gate, up and their product (3i;
    the eager SwiGLU also keeps SiLU(gate): 4i). A frozen linear keeps nothing of its own.
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 4 * h + 2 * q + 2 * kv + (3 if fused else 4) * i


def activation_bytes(shape: Shape, *, batch: int, seq: int, elem: int, checkpointing: str = "off",
                     fused: bool = False, answer_fraction: float = 1.0) -> int:
    """Device bytes of activations at the step's peak.

    - off: every layer's :func:`layer_values`, for all tokens.
    - layers: each layer's input (h per token), plus one layer recomputed during its backward.
    - offload: the inputs live in host memory; two are on the device at a time (the layer in
      backward and the one prefetched), plus one layer recomputed.

    Plus the head: the final norm's input and output (2h per token) and, for the loss, the
    answer tokens' rows (h) and their gradient (h). The full logits are never built by the
    fused loss; without it they are (vocab per token in the compute dtype and again in fp32).
    """
    tokens = batch * seq
    per_layer = tokens * layer_values(shape, fused=fused) * elem
    kept = tokens * shape.hidden * elem
    layers = {
        "off": shape.layers * per_layer,
        "layers": shape.layers * kept + per_layer,
        "offload": 2 * kept + per_layer,
    }[checkpointing]
    answers = int(tokens * answer_fraction)
    head = 2 * tokens * shape.hidden * elem + 2 * answers * shape.hidden * elem
    if not fused:
        head += answers * shape.vocab * (elem + 4)
    return layers + head


def plan(config: dict, *, r: int, targets: list[str], batch_size: int, seq_len: int,
         load_4bit: bool = False, compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
         checkpointing: str = "off", embedding_on_host: bool = False, answer_fraction: float = 1.0) -> Plan:
    """``checkpointing`` is the resolved mode (off, layers, offload); the fused kernels and the
    fused loss are what a CUDA fit uses, the eager ones what a CPU fit uses."""
    s = Shape.from_config(config)
    e = torch.finfo(compute_dtype).bits // 8
    cuda = device == "cuda"
    host_emb = embedding_on_host and not s.tied
    n, other = s.params, s.other_params - (s.embedding_params if host_emb else 0)
    a = s.adapter_params(r, targets)
    act = activation_bytes(s, batch=batch_size, seq=seq_len, elem=e, checkpointing=checkpointing, fused=cuda,
                           answer_fraction=answer_fraction)
    dense = (n - (s.embedding_params if host_emb else 0)) * e
    adapter = 4 * a + (2 * a if cuda else 0)  # fp32 weights, and their bf16 copies under autocast
    nf4 = s.layers * sum(nf4_bytes(i * o) for i, o in s.linears().values())
    modes = {
        "full": Breakdown(weights=n * e, gradients=n * e, optimizer=2 * n * e, adapter=0, activations=act),
        "lora": Breakdown(weights=dense, gradients=4 * a, optimizer=8 * a, adapter=adapter, activations=act),
        "qlora": Breakdown(weights=nf4 + other * e, gradients=4 * a, optimizer=(2 if cuda else 8) * a,
                           adapter=adapter, activations=act),
    }
    return Plan(s, modes, compute_dtype, device, checkpointing, host_emb)
