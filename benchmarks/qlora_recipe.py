"""Find the --4bit recipe: train QLoRA variants on the ISO-date demo, score exact match.

    python benchmarks/qlora_recipe.py plain loftq keep-attn ...   # see VARIANTS
    python benchmarks/qlora_recipe.py --epochs 2 chosen

Each variant: `fit --4bit` with the variant's recipe on the bundled demo, then
greedy exact match on the first --n held-out examples, with the adapter on the
NF4 base and on the 16-bit base (the server may serve either). Results are
appended to benchmarks/results/cpu/qlora_recipe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = {
    "plain": dict(lr=2e-4),
    "plain-lr1e-3": dict(lr=1e-3),
    "plain-lr5e-4": dict(lr=5e-4),
    "keep-attn": dict(lr=5e-4, keep_16bit=("q_proj", "k_proj", "v_proj", "o_proj")),
    "keep-mlp-down": dict(lr=5e-4, keep_16bit=("down_proj",)),
}
OUT = Path(__file__).parent / "results" / "cpu" / "qlora_recipe.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", choices=sorted(VARIANTS) + ["chosen"])
    p.add_argument("--score-base", action="store_true", help="also score the base alone, NF4 and 16-bit")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--n", type=int, default=100, help="held-out examples scored")
    p.add_argument("--runs", type=Path, default=Path("runs/qlora-recipe"))
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trainer.base import resolve
    from trainer.demo.dates import EVAL_FILE
    from trainer.evaluate import evaluate, load_for_eval
    from trainer.fit import FitArgs, run
    from trainer.qlora import RECIPE

    base = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(base.path)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if a.score_base:
        import bitsandbytes as bnb

        row = {"variant": "base-only", "scores": {}}
        for four in (True, False):
            model = load_for_eval(base, load_4bit=four)
            n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
            r = evaluate(model, tok, EVAL_FILE, label="base", limit=a.n, max_seq_len=256)
            row["scores"]["nf4" if four else "bf16"] = {"exact_match": r.exact_match, "loss": r.loss,
                                                        "linear4bit_modules": n4, "sample": r.samples[0]}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for name in a.variants:
        recipe = RECIPE if name == "chosen" else replace(RECIPE, **VARIANTS[name])
        t0 = time.time()
        result = run(FitArgs(load_4bit=True, lr=recipe.lr, epochs=a.epochs, recipe=recipe, out=a.runs, name=name,
                             overwrite=True), progress=False)
        fit_s = time.time() - t0
        scores = {}
        for four in (True, False):
            model = load_for_eval(base, load_4bit=four) if not recipe.keep_16bit or not four else None
            if model is None:  # the NF4 base the adapter was trained on keeps these modules 16-bit
                from trainer.model import choose_precision, load_base
                from trainer.qlora import bnb_skip_modules

                model = load_base(base, choose_precision(True), skip_modules=bnb_skip_modules(recipe)).eval()
            model = PeftModel.from_pretrained(model, result.out_dir)
            r = evaluate(model, tok, EVAL_FILE, label=name, limit=a.n, max_seq_len=256)
            scores["nf4" if four else "bf16"] = {"exact_match": r.exact_match, "loss": r.loss,
                                                 "sample": r.samples[0]}
            del model
        row = {"variant": name, "recipe": recipe.as_dict(), "epochs": a.epochs, "fit_seconds": round(fit_s),
               "first_loss": result.losses[0], "final_loss": sum(result.losses[-5:]) / 5,
               "eval_loss_split": result.manifest["metrics"]["eval_loss"], "scores": scores,
               "host": platform.node(), "torch_threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
