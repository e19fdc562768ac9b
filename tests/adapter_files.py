"""Real PEFT-layout LoRA adapter files for the tiny Llama of ``tests/tiny.py``, made in code.

No PEFT and no model: ``adapter_config.json`` as PEFT writes it and a
safetensors file whose keys and shapes are what ``save_pretrained`` produces
(lora_A [r, in], lora_B [out, r], under ``base_model.model.model.layers.<i>``).
"""

from __future__ import annotations

import io
import json
import tarfile

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 512,
    "tie_word_embeddings": False,
}
FINGERPRINT = "ab" * 32
LINEARS = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
           "gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128)}
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def tiny_base():
    from server.adapters.upload import BaseSpec

    return BaseSpec.from_config("tiny-llama", TINY_CONFIG, FINGERPRINT)


def adapter_config(r: int = 8, targets=("q_proj", "v_proj"), **changes) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none",
            "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "task_type": "CAUSAL_LM",
            **changes}


def lora_tensors(r: int = 8, targets=("q_proj", "v_proj"), *, layers: int = 2, linears=LINEARS, seed: int = 0,
                 ranks: dict[str, int] | None = None) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for t in targets:
            rank = (ranks or {}).get(t, r)
            in_f, out_f = linears[t]
            prefix = f"base_model.model.model.layers.{layer}.{_GROUP[t]}.{t}"
            # Magnitudes of a trained adapter: A near PEFT's init (|A| ~ sqrt(r)), B small.
            out[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5  # [r, in]
            out[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.05  # [out, r]
    return out


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def adapter_files(*, config: dict | None = None, tensors: dict | None = None,
                  fingerprint: str | None = FINGERPRINT) -> dict[str, bytes]:
    """``{filename: bytes}`` of a good adapter (with a loraplex.json unless ``fingerprint`` is None)."""
    config = config or adapter_config()
    files = {"adapter_config.json": json.dumps(config).encode(),
             "adapter_model.safetensors": safetensors_bytes(tensors if tensors is not None
                                                            else lora_tensors(config["r"], config["target_modules"]))}
    if fingerprint is not None:
        files["loraplex.json"] = json.dumps({"format": "loraplex-adapter/1",
                                             "base": {"name": "tiny-llama", "fingerprint": fingerprint}}).encode()
    return files


def uploads(files: dict[str, bytes]) -> list:
    from server.adapters.upload import UploadFile

    return [UploadFile(name, data) for name, data in files.items()]


def tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """A tar.gz of regular files (``name -> bytes``) and symlinks (``name -> target``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()
