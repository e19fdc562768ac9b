"""The shared rule book: what the trainer refuses to write and the server refuses to upload."""

import pytest

from server.adapters.compat import (
    VLLM_RANKS, IncompatibleAdapter, check_adapter_config, ensure_same_base, ensure_servable,
)

GOOD = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": None, "use_dora": False, "bias": "none", "init_lora_weights": True}


def fields(config, **kw):
    return [v.field for v in check_adapter_config(config, architecture="LlamaForCausalLM", **kw)]


def test_plain_lora_passes():
    assert fields(GOOD) == []
    ensure_servable(GOOD, architecture="LlamaForCausalLM")


@pytest.mark.parametrize("change, field", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "use_dora"),
    ({"r": 12}, "r"),
    ({"r": 0}, "r"),
    ({"r": "16"}, "r"),
    ({"bias": "all"}, "bias"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"rank_pattern": {"q_proj": 24}}, "rank_pattern[q_proj]"),
    ({"rank_pattern": {"q_proj": 32}}, "rank_pattern[q_proj]"),  # a vLLM rank, but 0.25 ignores the override
    ({"alpha_pattern": {"v_proj": 8}}, "alpha_pattern[v_proj]"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"lora_alpha": "32"}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_alpha": 1e308}, "lora_alpha"),  # finite, but a scaling that overflows any 16-bit activation
    ({"use_qalora": True}, "use_qalora"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"trainable_token_indices": [5]}, "trainable_token_indices"),
    ({"init_lora_weights": 3}, "init_lora_weights"),
    # Tenant patterns: RE2 or nothing; pattern keys vLLM would run as regexes must be plain names.
    ({"target_modules": r"(q)_proj\1"}, "target_modules"),  # a backreference: no bounded-time match
    ({"target_modules": "(?=q)q_proj"}, "target_modules"),  # lookahead
    ({"target_modules": "q_proj|" * 200}, "target_modules"),  # too long
    ({"rank_pattern": {"(.*.*)*x": 16}}, "rank_pattern[(.*.*)*x]"),
    ({"alpha_pattern": {"q_proj$|(a+)+": 32}}, "alpha_pattern[q_proj$|(a+)+]"),
])
def test_each_rule_names_its_field(change, field):
    assert fields({**GOOD, **change}) == [field]


def test_all_violations_are_reported_together():
    with pytest.raises(IncompatibleAdapter) as e:
        ensure_servable({**GOOD, "use_dora": True, "modules_to_save": ["embed_tokens"]}, architecture="LlamaForCausalLM")
    assert {v.field for v in e.value.violations} == {"use_dora", "modules_to_save"}
    assert "DoRA" in str(e.value) and "modules_to_save" in str(e.value)


def test_max_rank_of_the_server_narrows_allowed_ranks():
    assert fields({**GOOD, "r": 32}, max_rank=16) == ["r"]
    assert fields({**GOOD, "r": 16}, max_rank=16) == []
    assert 512 in VLLM_RANKS and 12 not in VLLM_RANKS


def test_unknown_architecture_is_refused():
    vs = check_adapter_config(GOOD, architecture="GPT2LMHeadModel")
    assert [v.field for v in vs] == ["architecture"]


def test_base_fingerprint_must_match():
    ensure_same_base(None, "a" * 64)  # adapters without a manifest are checked elsewhere
    ensure_same_base("a" * 64, "a" * 64)
    with pytest.raises(IncompatibleAdapter, match="base_fingerprint"):
        ensure_same_base("b" * 64, "a" * 64)


@pytest.mark.parametrize("key", ["r", "lora_alpha", "target_modules"])
def test_fields_vllm_requires_must_be_there(key):
    config = {k: v for k, v in GOOD.items() if k != key}
    assert fields(config) == [key]


def test_options_that_change_nothing_pass():
    assert fields({**GOOD, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {"v_proj": 32}, "use_rslora": True,
                   "use_qalora": False, "layer_replication": None, "init_lora_weights": "gaussian"}) == []


def test_patterns_with_nested_quantifiers_resolve_in_re2():
    """(x*)*-style patterns backtrack exponentially in Python's re; RE2 takes them in linear time,
    and what they match is what PEFT would target."""
    from server.adapters.compat import tenant_pattern

    assert fields({**GOOD, "target_modules": "(.*_*)*(q|v)_proj(.*.*.*.*.*.*)*$"}) == []
    assert type(tenant_pattern("(a+)+$")).__module__.startswith("re2")
    assert fields({**GOOD, "target_modules": "(.*_*)*(x|y)_proj"}) == ["target_modules"]  # matches nothing
