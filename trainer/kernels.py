"""Faster kernels for the training step, put on one model instance, never on transformers globally.

Four things, each on CUDA only and each optional (:class:`Kernels`):

- **Liger's RMSNorm and SwiGLU** (Triton, ``liger-kernel``): one pass over the
  activations instead of the five or six elementwise kernels of the eager
  modules, and the SwiGLU saves only its two inputs. They replace the
  ``forward`` of this model's norm and MLP modules; the classes, and every other
  model in the process, are untouched (Unsloth and ``apply_liger_kernel_to_*``
  patch transformers' modules globally).
- **Padding-free varlen attention.** A batch is laid out as one row of all its
  examples, no padding, with the document boundaries as ``cu_seqlens``:
  FlashAttention's varlen kernel (``torch.nn.attention.varlen``, torch >= 2.10)
  attends within each example only. It is registered under transformers'
  ``AttentionInterface`` as :data:`VARLEN`; the model asks for it by name.
- **The LoRA update as one GEMM epilogue**: ``addmm(base_out, x @ A.T, B.T, alpha=scale)``
  adds ``scale * B(A x)`` into the base output inside the matmul, where PEFT
  computes ``B(A x)``, scales it, adds it in two more passes over ``[tokens,
  out]``, and for 4-bit bases first clones the base output.
- :func:`available` probes Liger and varlen once, against PyTorch's own SDPA and norm, so a
  host where a kernel is missing or wrong trains on the eager path and says so.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import cache

import torch

logger = logging.getLogger(__name__)

VARLEN = "loraplex_varlen"
"""The attention implementation name registered with transformers."""

# Norm and MLP classes whose forward is exactly Llama's (RMSNorm with the weight applied after the
# cast back; down(silu(gate(x)) * up(x))). Gemma's norm adds 1 to its weight and is not listed.
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


@dataclass(frozen=True)
class Kernels:
    """Which fast paths a CUDA fit may use. Each is measured on its own in benchmarks/trainer_gpu.py."""

    liger: bool = True
    """Liger's RMSNorm and SwiGLU kernels on this model's norm and MLP modules."""
    varlen: bool = True
    """Padding-free batches through FlashAttention's varlen kernel (else SDPA with a block-diagonal mask)."""
    fused_loss: bool = True
    """The LM head and cross-entropy fused and chunked, on answer tokens only (trainer/loss.py)."""
    embed_on_host: bool = True
    """Keep a frozen, untied input embedding in host memory: a step reads a few thousand of its rows
    (32 MiB for 2 x 2048 tokens of an 8B model) and the GPU saves the whole table (0.98 GiB)."""
    lora_epilogue: bool = True
    """Each LoRA update added inside one addmm, not as three passes over the layer output."""
    checkpointing: str = "auto"
    """off | layers | offload | auto (trainer/checkpoint.py)."""


KERNELS = Kernels()


# ---------------------------------------------------------------- Liger


@cache
def _liger():
    try:
        from liger_kernel.ops import LigerRMSNormFunction, LigerSiLUMulFunction
    except Exception as e:  # not installed, or Triton missing (CPU hosts)
        return None, str(e)
    return (LigerRMSNormFunction, LigerSiLUMulFunction), None


def _rms_norm(module, hidden):
    norm, _ = _liger()[0]
    # casting_mode "llama": x * rstd in fp32, cast to the input dtype, then times the weight, as LlamaRMSNorm
    return norm.apply(hidden, module.weight, module.variance_epsilon, 0.0, "llama", False)


def _swiglu(module, x):
    _, silu_mul = _liger()[0]
    return module.down_proj(silu_mul.apply(module.gate_proj(x), module.up_proj(x)))


def apply_liger(model) -> dict[str, int]:
    """Point this model's RMSNorm and SwiGLU-MLP modules at Liger's kernels; returns counts per kind."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        kind = type(module).__name__
        if kind in _RMS_NORMS:
            module.forward = _rms_norm.__get__(module)
            counts["rms_norm"] += 1
        elif kind in _MLPS and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = _swiglu.__get__(module)
            counts["swiglu"] += 1
    return counts


# ---------------------------------------------------------------- LoRA


def _lora_forward(module, x, *args, **kwargs):
    """PEFT's unmerged single-adapter LoRA forward, the update fused into an addmm epilogue."""
    result = module.base_layer(x, *args, **kwargs)  # [..., out]
    name = module.active_adapters[0]
    a, b = module.lora_A[name].weight, module.lora_B[name].weight  # [r, in], [out, r]
    x_in = x if torch.is_autocast_enabled() else x.to(a.dtype)  # as PEFT: A in the adapter's dtype
    xa = torch.nn.functional.linear(module.lora_dropout[name](x_in), a)  # [..., r]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(result.dtype),
                      b.t().to(result.dtype), alpha=module.scaling[name])
    return out.view(result.shape)


def apply_lora_epilogue(model) -> int:
    """Give this model's plain LoRA layers (one active adapter, unmerged, no DoRA or other variant) the
    fused forward; returns how many. Layers in any other state keep PEFT's forward."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "base_layer"):
            continue
        if (len(module.active_adapters) != 1 or module.merged or module.disable_adapters
                or getattr(module, "lora_variant", {}) or any(module.use_dora.values())):
            continue
        module.forward = _lora_forward.__get__(module)
        n += 1
    return n


# ---------------------------------------------------------------- varlen attention


@cache
def _attend():
    """torch's varlen kernel with the causal flag of this torch (2.10: is_causal; 2.11+: window_size)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # 2.11+ / 2.10
    if "enable_gqa" in params:
        extra["enable_gqa"] = True

    def attend(q, k, v, cu_seqlens, max_len, scale):
        # q [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim]; FlashAttention takes fewer kv heads
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **extra)

    return attend


def _attend_reference(q, k, v, cu_seqlens, max_len, scale):
    """The same function with SDPA, one example at a time (CPU, and the check of the kernel)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        qa, ka, va = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [heads, len, head_dim]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qa, ka.repeat_interleave(groups, 0), va.repeat_interleave(groups, 0), is_causal=True,
            scale=scale).transpose(0, 1)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature over a padding-free batch: query [1, heads, tokens, head_dim]."""
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    attend = _attend() if q.is_cuda else _attend_reference
    out = attend(q, k, v, cu, max_len, scaling)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim], as transformers' sdpa returns


@cache
def register_varlen() -> None:
    """Make ``attn_implementation=VARLEN`` loadable: the function, and a mask function that builds no mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)


def _probe_varlen(device) -> None:
    """Two packed documents through varlen, against SDPA on each one alone (GQA 4:2)."""
    g = torch.Generator(device=device).manual_seed(0)
    lens = [5, 11]
    q = torch.randn(sum(lens), 4, 64, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(lens), 2, 64, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    cu = torch.tensor([0, lens[0], sum(lens)], device=device, dtype=torch.int32)
    out = _attend()(q, k, v, cu, max(lens), None)
    ref = _attend_reference(q, k, v, cu, max(lens), None)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    if not err < 2e-2:
        raise RuntimeError(f"varlen attention differs from SDPA by {err:.3g}")


def _probe_liger(device) -> None:
    (norm, silu_mul), _ = _liger()
    x = torch.randn(8, 256, device=device, dtype=torch.bfloat16)
    w = torch.rand(256, device=device, dtype=torch.bfloat16)
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    got = norm.apply(x, w, 1e-5, 0.0, "llama", False)
    ref2 = torch.nn.functional.silu(x) * w
    got2 = silu_mul.apply(x.clone(), w.expand_as(x).contiguous())
    for a, b in ((got, ref), (got2, ref2)):
        if not ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2:
            raise RuntimeError("Liger's kernels differ from the eager modules")


@cache
def available(device: str) -> dict[str, str | None]:
    """Per fast path: None if it runs here, else why not (logged once)."""
    why: dict[str, str | None] = {"liger": "needs CUDA", "varlen": "needs CUDA"}
    if device != "cuda" or not torch.cuda.is_available():
        return why
    if _liger()[0] is None:
        why["liger"] = f"liger-kernel is not importable ({_liger()[1]})"
    else:
        try:
            _probe_liger(device)
            why["liger"] = None
        except Exception as e:
            why["liger"] = f"probe failed: {e}"
    try:
        _probe_varlen(device)
        why["varlen"] = None
    except Exception as e:  # torch < 2.10, or a kernel that refuses this GPU
        why["varlen"] = f"probe failed: {type(e).__name__}: {e}"
    for name, reason in why.items():
        if reason:
            logger.warning("training without %s kernels: %s", name, reason)
    return why
