"""End to end: `fit` on the tiny model in 16-bit and 4-bit, then the adapter in PEFT and in vLLM."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.conftest import vllm_greedy
from trainer.fit import FitArgs, run

PROMPTS = ["<|im_start|>user\nmonth march day 3<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nmonth october day 9<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module", params=[False, True], ids=["lora16", "qlora4"])
def trained(request, tiny_base, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = FitArgs(base=str(tiny_base), data=tiny_data, r=8, targets="all-linear", load_4bit=request.param,
                   epochs=6, lr=3e-3, batch_size=8, eval_split=0.125, seed=0, out=out, name="tiny-task")
    return run(args, progress=False)


def test_files_and_manifest(trained, tiny_base):
    from trainer.base import fingerprint

    files = {p.name for p in trained.out_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "loraplex.json", "metrics.jsonl"} <= files
    assert "checkpoint" not in files and not any(f.startswith(".") for f in files)
    m = json.loads((trained.out_dir / "loraplex.json").read_text())
    assert m["base"]["fingerprint"] == fingerprint(tiny_base)
    assert len(m["tokenizer"]["hash"]) == 64 and "<|im_start|>" in m["tokenizer"]["chat_template"]
    assert m["training"]["args"]["r"] == 8
    for key in ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_s", "peak_memory_bytes"):
        assert m["metrics"][key] > 0, key
    log = [json.loads(line) for line in (trained.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, m["metrics"]["steps"] + 1))


def test_loss_falls(trained):
    first = sum(trained.losses[:3]) / 3
    last = sum(trained.losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert trained.manifest["metrics"]["eval_loss"] < trained.losses[0]


def test_adapter_loads_in_peft_and_changes_output(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, trained.out_dir)
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_adapter_serves_in_vllm_and_differs_from_base(trained, vllm_engine):
    from vllm.lora.request import LoRARequest

    precision = trained.manifest["training"]["precision"]
    lora = LoRARequest(f"tiny-{precision}", 2 if precision.startswith("nf4") else 1, str(trained.out_dir))
    base_out = vllm_greedy(vllm_engine, PROMPTS)
    lora_out = vllm_greedy(vllm_engine, PROMPTS, lora=lora)
    assert lora_out != base_out
    # The task was learned: the adapter answers in the trained form.
    text = vllm_engine.get_tokenizer().decode(lora_out[0])
    assert text.startswith("answer"), text


def test_export_merge_matches_the_adapter(trained, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from trainer.__main__ import app

    out = tmp_path / "merged"
    r = CliRunner().invoke(app, ["export", str(trained.out_dir), "--merge", "--out", str(out),
                                 "--base", str(tiny_base)])
    assert r.exit_code == 0, r.output
    four = trained.manifest["training"]["args"]["load_4bit"]
    assert ("trained on a 4-bit" in r.output) == four
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                    trained.out_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        a, b = merged(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)  # bf16 rounding of the merged weights
    again = CliRunner().invoke(app, ["export", str(trained.out_dir), "--merge", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
