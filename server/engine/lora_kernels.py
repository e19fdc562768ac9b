"""Tuned block sizes for vLLM's multi-LoRA Triton kernels, per card.

vLLM 0.25.1 runs its LoRA shrink and expand kernels with one default config for every shape.
Their grids launch one block per (token block, output block, slice, active adapter), so a
decode batch spread over many distinct adapters launches mostly empty blocks, and the step
slows with every adapter it holds. ``benchmarks/lora_kernels.py`` times the real kernels on a
card and writes the block sizes that win, in the format vLLM reads from the folder named by
``VLLM_TUNED_CONFIG_FOLDER`` (``{GPU}_SHRINK.json``, ``{GPU}_EXPAND_{TRUE,FALSE}.json``);
``configs/`` holds those loraplex ships. This module only decides which folder the engine
gets: vLLM does the lookup (nearest batch size, shape and slot count).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "VLLM_TUNED_CONFIG_FOLDER"
BUNDLED = Path(__file__).parent / "configs"


def file_prefix(gpu_name: str) -> str:
    """vLLM's file-name form of ``torch.cuda.get_device_name()``."""
    return gpu_name.replace(" ", "_").replace("-", "_")


def has_configs(folder: Path, gpu_name: str) -> bool:
    return (folder / f"{file_prefix(gpu_name)}_SHRINK.json").is_file()


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def has_experts(model: str | Path) -> bool:
    """Whether the model's config.json describes MoE layers. vLLM takes a set
    ``VLLM_TUNED_CONFIG_FOLDER`` to mean that LoRA on MoE layers should read tuned files from it
    too (``lora/layers/fused_moe.py``), and loraplex ships none for those: such models keep
    vLLM's own choice unless a folder is named."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(k in c for c in (cfg, cfg.get("text_config") or {}) for k in MOE_KEYS)


def resolve(choice: str, gpu_name: str | None, environ: dict[str, str] | None = None, *,
            moe: bool = False) -> str | None:
    """The folder vLLM should read LoRA kernel configs from; None: loraplex names none (vLLM's
    defaults, or the folder your environment already names).

    ``choice`` is ``--lora-kernel-configs``: ``auto`` takes ``VLLM_TUNED_CONFIG_FOLDER`` if the
    environment sets it, else the bundled folder when it has this card's configs and the model
    has no MoE layers (:func:`has_experts`); ``off`` names none; anything else is a folder.
    ``gpu_name`` is None off CUDA."""
    environ = os.environ if environ is None else environ
    if choice == "off" or gpu_name is None:
        return None
    if choice != "auto":
        return choice
    if environ.get(ENV):
        return environ[ENV]
    return str(BUNDLED) if has_configs(BUNDLED, gpu_name) and not moe else None


def apply(choice: str, gpu_name: str | None, *, moe: bool = False) -> str | None:
    """Name the folder in ``VLLM_TUNED_CONFIG_FOLDER`` for the engine processes about to start;
    returns it. A folder the environment already names is never removed: vLLM also reads fused-MoE
    and Mamba kernel configs from it. Off CUDA (``gpu_name`` None) nothing changes."""
    if gpu_name is None:
        return None
    folder = resolve(choice, gpu_name, moe=moe)
    if folder is None:
        logger.info("LoRA kernels: vLLM's default configs%s (%s)",
                    f" or {os.environ[ENV]}" if os.environ.get(ENV) else "",
                    "--lora-kernel-configs off" if choice == "off" else
                    "a MoE model" if moe else f"none shipped for {gpu_name}")
        return os.environ.get(ENV) or None
    os.environ[ENV] = folder
    if not has_configs(Path(folder), gpu_name):
        logger.warning("LoRA kernels: %s has no configs for %s; vLLM uses its defaults", folder, gpu_name)
    else:
        logger.info("LoRA kernels: tuned configs for %s from %s", gpu_name, folder)
    return folder


def batch_keys(folder: str | Path | None, gpu_name: str) -> list[list[int]]:
    """The batch sizes (``m``) each table of the tuned files is keyed by, in file order (vLLM's
    nearest-key lookup breaks ties by that order): one list per (file, slot count, slice count)."""
    if folder is None:
        return []
    out = []
    prefix = file_prefix(gpu_name)
    for name in ("SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"):
        try:
            doc = json.loads((Path(folder) / f"{prefix}_{name}.json").read_text())
        except (OSError, ValueError):
            continue
        out += [[int(m) for m in by_m] for by_slices in doc.values() for by_m in by_slices.values()]
    return out


def _compiled_as(m: int, keys: list[list[int]]) -> tuple:
    """What Triton compiles a LoRA kernel launch over ``m`` tokens as: the config vLLM looks up
    (its nearest batch key per table; vLLM's defaults change at 128) and the integer
    specializations of ``M`` (== 1, divisible by 16)."""
    return (m == 1, m % 16 == 0, m < 128, *(min(ks, key=lambda k: abs(k - m)) for ks in keys if ks))


def warmup_sizes(keys: list[list[int]], captured: list[int], max_tokens: int) -> list[int]:
    """Batch sizes to run once at start so that no LoRA kernel is compiled while serving.

    A batch no larger than the largest CUDA graph runs padded to a captured size, whose kernels
    were compiled when it was captured. A larger batch (a prefill) runs eagerly, and its first
    launch of a config no captured size used stops the engine for a Triton compile (seconds).
    Returns the smallest uncovered size of each such config, in order."""
    keys = [list(ks) for ks in dict.fromkeys(tuple(ks) for ks in keys)]
    top = max(captured, default=0)
    covered = {_compiled_as(m, keys) for m in captured}
    sizes = []
    for m in range(top + 1, max_tokens + 1):
        sig = _compiled_as(m, keys)
        if sig not in covered:
            covered.add(sig)
            sizes.append(m)
    return sizes
