"""Load a base for training (16-bit or NF4) and wrap it with a LoRA adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.adapters.compat import LORA_TARGETS, IncompatibleAdapter, Violation, target_violations
from trainer.base import BaseModel

logger = logging.getLogger(__name__)


class QuantizationUnavailable(RuntimeError):
    """--4bit was asked for where bitsandbytes cannot quantize."""


@dataclass(frozen=True)
class Precision:
    """How weights are held and computed on this host."""

    load_4bit: bool
    compute_dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        return ("nf4+" if self.load_4bit else "") + str(self.compute_dtype).removeprefix("torch.")


def choose_precision(load_4bit: bool) -> Precision:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    On CPU fp32 is both the accurate and (without AMX) the fast choice; the
    16-bit *checkpoint* is upcast on load. NF4 dequantizes into this dtype.
    """
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Precision(load_4bit, dtype, "cuda")
    return Precision(load_4bit, torch.float32, "cpu")


def check_bitsandbytes() -> None:
    """Fail early, naming --4bit, when NF4 cannot run here."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit
    except Exception as e:  # ImportError, or a broken native library
        raise QuantizationUnavailable(f"--4bit needs bitsandbytes, which failed to import: {e}") from e
    try:
        probe = torch.randn(64, 64, device="cuda" if torch.cuda.is_available() else "cpu")
        quantize_4bit(probe, quant_type="nf4", compress_statistics=True)
    except Exception as e:
        raise QuantizationUnavailable(
            f"--4bit: bitsandbytes {bnb.__version__} cannot quantize to NF4 on this host ({e})") from e


def resolve_targets(targets: str, base: BaseModel) -> list[str] | str:
    """`all-linear` or a comma list, checked against what vLLM takes LoRA on."""
    value: list[str] | str = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if violations := target_violations(value, base.architecture, field="--targets"):
        raise IncompatibleAdapter(violations)
    if value == "all-linear":
        # Spell it out: PEFT's all-linear also skips lm_head, but an explicit list is
        # what the manifest and vLLM see, with no guessing.
        return sorted(LORA_TARGETS[base.architecture])
    return value


def load_base(base: BaseModel, precision: Precision, *, skip_modules: list[str] | None = None,
              attn_implementation: str | None = None):
    """The base in the compute dtype, its target linears in NF4 with --4bit.

    Nothing is upcast: embeddings, norms and ``lm_head`` stay in the compute dtype
    (bf16 on CUDA), where ``prepare_model_for_kbit_training`` would make them fp32
    and with them the whole residual stream outside the 4-bit matmuls.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": precision.compute_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if precision.load_4bit:
        check_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=precision.compute_dtype,
            llm_int8_skip_modules=skip_modules,  # also the 4-bit skip list, despite its name
        )
    if precision.load_4bit or precision.device == "cuda":
        kwargs["device_map"] = {"": precision.device}  # straight onto the GPU, not through host memory
    model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    if "device_map" not in kwargs:
        model.to(precision.device)
    return model


def lora_config(*, r: int, alpha: int, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",  # vLLM serves no LoRA bias
        task_type="CAUSAL_LM",
    )


def violation_for_4bit(e: Exception) -> IncompatibleAdapter:
    return IncompatibleAdapter([Violation("--4bit", str(e))])
