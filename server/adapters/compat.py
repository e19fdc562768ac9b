"""What vLLM can serve: the one rule book the trainer and the server share.

vLLM refuses some PEFT adapters at load time and, worse, silently serves base
output for others (an adapter made for another base, targets the model class
has no LoRA slot for). loraplex moves every such check to the moment an adapter
is *made* (the trainer refuses to write it) or *uploaded* (the server refuses
to register it), so a request never meets a broken adapter.

Rules (mirroring vLLM's ``PEFTHelper.validate_legal`` and its model classes):

- rank ``r`` (and every ``rank_pattern`` value) is one of vLLM's
  ``max_lora_rank`` values and not above the server's ``--max-lora-rank``;
- no ``modules_to_save`` (vLLM has no slot for full embed_tokens/lm_head copies);
- the fields vLLM's ``PEFTHelper`` requires (``r``, ``lora_alpha``, ``target_modules``),
  with the types it assumes;
- no DoRA, no LoRA bias, no init that rewrites base weights (LoftQ, PiSSA, ...), and
  no other PEFT option that changes the forward pass in a way one of the two vLLM
  lines loraplex runs on (0.25 on GPU, 0.32 on CPU) ignores (QA-LoRA, per-module
  rank/alpha overrides, ...);
- every target is a linear layer that vLLM's class for the base's architecture
  takes LoRA on;
- the adapter was trained on this base (same fingerprint), when it says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# vLLM's `MaxLoRARanks` (vllm/config/lora.py, identical in 0.25 and 0.32):
# `--max-lora-rank` takes only these, and vLLM sizes its LoRA slots by it.
VLLM_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Linear layers vLLM's model class takes LoRA on, per HF architecture. vLLM packs
# q/k/v into qkv_proj and gate/up into gate_up_proj; PEFT names are the unpacked ones.
_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# Where each of those linears sits in the model: model.layers.<i>.<parent>.<linear>. vLLM matches an
# adapter's tensors by that full path and silently drops one it has no module for (a q_proj under
# mlp., say), so the upload check holds tensors to it.
LINEAR_PARENTS: dict[str, str] = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_TARGETS: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}

# init_lora_weights values that only set the starting A/B (vLLM's own allow-list);
# any other string (loftq, pissa, olora, corda) changes base weights at load time.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


@dataclass(frozen=True)
class Violation:
    """One reason an adapter cannot be served. ``field`` names the adapter_config
    key (or trainer flag) at fault, so both fronts can point at it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class IncompatibleAdapter(ValueError):
    """An adapter vLLM would refuse or mis-serve. Carries every violation, not just the first."""

    def __init__(self, violations: Iterable[Violation]):
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


MAX_PATTERN_CHARS = 512


def tenant_pattern(text: str):
    """A tenant-supplied regular expression, compiled by RE2: matching takes time linear in the
    input and memory is capped, whatever the pattern. Raises ValueError for one RE2 cannot take
    (backreferences, lookaround) or one too long or too large."""
    import re2

    if len(text) > MAX_PATTERN_CHARS:
        raise ValueError(f"is a pattern of {len(text)} characters; at most {MAX_PATTERN_CHARS} are accepted")
    options = re2.Options()
    options.log_errors, options.max_mem = False, 1 << 20
    try:
        return re2.compile(text, options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"is not a regular expression loraplex can match in bounded time (RE2: {why})") from None


def rank_violation(r: Any, *, field: str = "r", max_rank: int | None = None) -> Violation | None:
    allowed = [x for x in VLLM_RANKS if max_rank is None or x <= max_rank]
    if isinstance(r, bool) or not isinstance(r, int) or r not in allowed:
        why = "vLLM accepts no other ranks" if max_rank is None else f"the server's --max-lora-rank is {max_rank}"
        return Violation(field, f"must be one of {', '.join(map(str, allowed))} ({why}); got {r!r}")
    return None


def target_violations(targets: Any, architecture: str, *, field: str = "target_modules") -> list[Violation]:
    supported = LORA_TARGETS.get(architecture)
    if supported is None:
        known = ", ".join(sorted(LORA_TARGETS))
        return [Violation("architecture", f"{architecture!r} is not a base loraplex serves adapters for (known: {known})")]
    if targets == "all-linear":
        return []
    if isinstance(targets, str):
        # PEFT treats a string as a regex over full module names; resolve it the same way, in
        # RE2 (linear time, bounded memory): a tenant's pattern never runs in a backtracking engine.
        try:
            pattern = tenant_pattern(targets)
        except ValueError as e:
            return [Violation(field, f"{e}; got {targets[:100]!r}")]
        names = [m for m in supported if pattern.fullmatch(m) or pattern.search(m)]
        if not names:
            return [Violation(field, f"regex {targets!r} matches none of {', '.join(sorted(supported))}")]
        return []
    if not isinstance(targets, (list, tuple, set)) or not targets or not all(isinstance(t, str) for t in targets):
        return [Violation(field, f"must be 'all-linear' or a non-empty list of module names; got {targets!r}")]
    bad = sorted(str(t) for t in targets if t not in supported)
    if bad:
        return [Violation(field, f"vLLM takes no LoRA on {', '.join(bad)} for {architecture}; "
                                 f"choose from {', '.join(sorted(supported))}")]
    return []


# PEFT options that change the forward pass and that vLLM does not implement. vLLM 0.32
# refuses each of them; vLLM 0.25 refuses some and silently serves the others as a plain
# LoRA (use_qalora: measured on an H200, output equal to the same weights without the flag).
# Refused here on both lines, with one message.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA adapters are not supported by vLLM",
    "lora_bias": "LoRA bias terms are not supported by vLLM",
    "use_qalora": "QA-LoRA pools the layer input, which vLLM does not do (vLLM 0.25 serves it as a plain LoRA, "
                  "wrongly)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported by vLLM",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported by vLLM",
    "layer_replication": "is not supported by vLLM",
    "layers_to_transform": "is not supported by vLLM",
    "trainable_token_indices": "trainable embedding tokens are not supported by vLLM",
    "target_parameters": "LoRA on parameters (not modules) is not supported by vLLM",
    "arrow_config": "Arrow routing between LoRA experts is not supported by vLLM",
    "kasa_config": "KaSA adapters are not supported by vLLM",
    "monteclora_config": "MonteCLoRA adapters are not supported by vLLM",
}
MAX_SCALING = 1e4
"""|lora_alpha / r| above this overflows fp16 activations: refused as out of range."""
_BOOLEANS = ("use_rslora", "use_dora", "lora_bias", "use_qalora", "fan_in_fan_out", "inference_mode")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def _pattern_violations(config: Mapping[str, Any], key: str, default: Any, what: str) -> list[Violation]:
    """``rank_pattern`` / ``alpha_pattern``: per-module overrides. vLLM 0.32 applies them; vLLM 0.25
    ignores them and serves every module with ``r`` and ``lora_alpha`` -- a different forward pass.
    So only entries that change nothing are accepted."""
    pattern = config.get(key)
    if pattern is None:
        return []
    if not isinstance(pattern, dict):
        return [Violation(key, f"must be an object of module pattern -> {what}; got {type(pattern).__name__}")]
    out = []
    for name, value in pattern.items():
        if not _PLAIN_KEY.fullmatch(name):
            # vLLM matches each key as a regex (re.match) inside the engine process: only plain
            # module names, which cannot backtrack, may get that far.
            out.append(Violation(f"{key}[{name[:100]}]", "must be a plain module name (letters, digits, '_', '.', "
                                 "'-'), not a regular expression"))
        elif not _number(value):
            out.append(Violation(f"{key}[{name}]", f"must be a number; got {value!r}"))
        elif value != default:
            out.append(Violation(f"{key}[{name}]", f"{what} {value!r} differs from the adapter's {default!r}; "
                                 "per-module overrides are refused because vLLM 0.25 ignores them and would serve "
                                 "this adapter wrongly (give every module the same rank and alpha)"))
    return out


def check_adapter_config(
    config: Mapping[str, Any],
    *,
    architecture: str,
    max_rank: int | None = None,
) -> list[Violation]:
    """Every reason vLLM would refuse (or mis-serve) a PEFT ``adapter_config.json``: the fields
    vLLM's ``PEFTHelper`` requires, with the types it assumes, and the options it cannot serve."""
    out: list[Violation] = []
    if config.get("peft_type", "LORA") != "LORA":
        out.append(Violation("peft_type", f"must be LORA; got {config.get('peft_type')!r}"))
    for key in ("r", "lora_alpha", "target_modules"):  # PEFTHelper's required fields
        if key not in config:
            out.append(Violation(key, "is required (vLLM reads it to load the adapter)"))
    if "r" in config and (v := rank_violation(config["r"], max_rank=max_rank)):
        out.append(v)
    if "lora_alpha" in config and not _number(config["lora_alpha"]):
        out.append(Violation("lora_alpha", f"must be a finite number; got {config['lora_alpha']!r}"))
    elif _number(config.get("lora_alpha")) and _number(config.get("r")) and config["r"] > 0:
        scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") is True else config["r"])
        if abs(scale) > MAX_SCALING:
            out.append(Violation("lora_alpha", f"gives a LoRA scaling of {scale:.3g}; more than {MAX_SCALING:g} "
                                 "turns the adapter's outputs into inf in 16-bit (PEFT's usual is 1 or 2)"))
    for key in _BOOLEANS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            out.append(Violation(key, f"must be true or false; got {config[key]!r}"))
    if config.get("modules_to_save"):
        out.append(Violation("modules_to_save", f"must be empty (vLLM serves no full-weight module copies); "
                                                f"got {config['modules_to_save']!r}"))
    if config.get("bias", "none") != "none":
        out.append(Violation("bias", "LoRA bias terms are not supported by vLLM"))
    for key, why in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            out.append(Violation(key, why))
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        out.append(Violation("init_lora_weights", f"must be true, false or an init name; got {init!r}"))
    elif isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        out.append(Violation("init_lora_weights", f"{init!r} rewrites base weights at load time, "
                                                  "which vLLM cannot do"))
    if _number(config.get("r")):
        out += _pattern_violations(config, "rank_pattern", config["r"], "rank")
    if _number(config.get("lora_alpha")):
        out += _pattern_violations(config, "alpha_pattern", config["lora_alpha"], "alpha")
    if "target_modules" in config:
        out += target_violations(config["target_modules"], architecture)
    return out


def ensure_servable(config: Mapping[str, Any], *, architecture: str, max_rank: int | None = None) -> None:
    """Raise :class:`IncompatibleAdapter` listing every violation, or return."""
    if violations := check_adapter_config(config, architecture=architecture, max_rank=max_rank):
        raise IncompatibleAdapter(violations)


def ensure_same_base(adapter_fingerprint: str | None, base_fingerprint: str) -> None:
    """An adapter that records its base must match the served base bit for bit
    (vLLM would otherwise serve it silently, and badly)."""
    if adapter_fingerprint is not None and adapter_fingerprint != base_fingerprint:
        raise IncompatibleAdapter([Violation(
            "base_fingerprint",
            f"adapter was trained on base {adapter_fingerprint[:16]}..., this base is {base_fingerprint[:16]}...",
        )])
