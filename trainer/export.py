"""Merge an adapter into its base and write a standalone bf16 model."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from server.adapters.compat import ensure_same_base
from trainer import base as base_mod
from trainer.evaluate import read_manifest

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    pass


def merge_adapter(adapter: Path, out: Path, *, base: str | None = None) -> str | None:
    """Merge into the *unquantized* base weights; return a warning, if any.

    An adapter trained on an NF4 base learned to correct NF4's rounding as well
    as the task; merged into 16-bit weights that correction has nothing to
    correct, so quality can differ from what was measured in training.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"ADAPTER {str(adapter)!r}: no adapter_config.json there")
    if out.exists():
        raise ExportError(f"--out {str(out)!r} already exists")
    manifest = read_manifest(adapter) or {}
    b = base_mod.resolve(base or manifest.get("base", {}).get("name") or base_mod.DEFAULT_BASE)
    if manifest:
        ensure_same_base(manifest["base"]["fingerprint"], b.fingerprint)
    model = AutoModelForCausalLM.from_pretrained(b.path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(b.path).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if manifest.get("training", {}).get("args", {}).get("load_4bit"):
        return ("this adapter was trained on a 4-bit (NF4) base; it is merged into the 16-bit base, "
                "whose weights differ from what it was trained against")
    return None
