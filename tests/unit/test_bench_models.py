"""benchmarks/models.py makes what the benchmarks serve: check it is what PEFT, the
server's upload rules and vLLM's adapter format expect, on a tiny base."""

from __future__ import annotations

import json
import os

from benchmarks.models import make_adapters, make_base
from server.adapters.upload import BaseSpec, validate
from trainer.base import resolve


def test_random_base_and_adapters_are_valid_and_share_weight_files(tmp_path):
    base = make_base(tmp_path / "base", "tiny")
    recorded = json.loads((base / "loraplex-base.json").read_text())["fingerprint"]
    b = resolve(base)
    assert b.architecture == "LlamaForCausalLM" and len(recorded) == 64
    dirs = make_adapters(base, 5, tmp_path / "adapters", distinct=2)
    assert [d.name for d in dirs] == ["a0", "a1", "a2", "a3", "a4"]
    ino = [os.stat(d / "adapter_model.safetensors").st_ino for d in dirs]
    assert ino[0] == ino[2] == ino[4] != ino[1] == ino[3]  # two weight files, hard-linked
    spec = BaseSpec.from_config("tiny", b.config, recorded)
    info = validate(dirs[1], spec, max_rank=16)
    assert info.rank == 16
    assert info.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[1])
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 linears, 2 layers: every saved tensor was picked up
    tok = AutoTokenizer.from_pretrained(base)
    assert tok("w5 w7")["input_ids"][-2:] == [5, 7]
