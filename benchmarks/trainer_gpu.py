"""The trainer on a GPU, side by side with HF Trainer + PEFT on the same batches (issue 20).

Workload: a Llama-3.1-8B-shaped base with random weights (``models.py base``), r=16 LoRA on every
linear layer, packed batches of 2 x 2048 tokens, 20 optimizer steps, the same data, seed, learning
rate, schedule and optimizer for both systems.

- ``loraplex``: ``trainer.fit.run`` as ``python -m trainer fit --packing --batch-size 2
  --max-seq-len 2048 --max-steps 20 [--4bit]`` runs it. ``--kernels '{"liger": false}'`` turns one
  fast path off, to measure what it buys on its own.
- ``hf``: transformers ``Trainer`` + PEFT as their docs configure QLoRA (NF4, double quant, bf16
  compute, ``prepare_model_for_kbit_training``, gradient checkpointing, ``paged_adamw_8bit``,
  ``bf16=True``) and, for 16-bit, the same without the quantization (``adamw_torch_fused``). It is
  fed the exact rows loraplex trains on, in the same order: ``trainer.data.batches`` with fit's seed.

Every run is its own process (clean CUDA memory statistics, nothing patched into the next run)
and appends one JSON row. tokens/s counts real (unpadded) tokens over steps 3-20: steps 1-2 hold
one-time costs (Triton compilation, cuBLAS and optimizer-state allocation), the same for both.

    python benchmarks/trainer_gpu.py prepare --work /root/tb
    python benchmarks/trainer_gpu.py run --work /root/tb --system hf --mode qlora --rows $OUT/rows.jsonl
    python benchmarks/trainer_gpu.py run --work /root/tb --system loraplex --mode qlora --rows $OUT/rows.jsonl
    python benchmarks/trainer_gpu.py report --rows $OUT/rows.jsonl --out benchmarks/results/h100/trainer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, BATCH, SEQ, R, SEED = 20, 2, 2048, 16, 0
WARMUP_STEPS = 2  # left out of tokens/s
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def lr_for(mode: str) -> float:
    from trainer.qlora import RECIPE

    return RECIPE.lr if mode == "qlora" else 2e-4  # python -m trainer fit's defaults


# ---------------------------------------------------------------- data


def make_data(path: Path, vocab: int, n: int = 600, seed: int = 0) -> Path:
    """Prompt/completion records of random words of the base's WordLevel vocabulary: prompts of 64-512
    tokens, answers of 64-512 (the loss covers the answers only, about half of every row)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = lambda k: " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(k))  # noqa: E731
            f.write(json.dumps({"prompt": words(rng.randint(64, 512)), "completion": " " + words(rng.randint(64, 512))})
                    + "\n")
    return path


def prepare(work: Path, shape: str = "llama-3.1-8b") -> None:
    """The base (written once; ~60 s for 16 GB on a GPU host) and the data."""
    from benchmarks.models import SHAPES, make_base

    work.mkdir(parents=True, exist_ok=True)
    make_base(work / "llama8b", shape)
    if not (work / "data.jsonl").exists():
        make_data(work / "data.jsonl", SHAPES[shape]["vocab_size"])


def fit_args(work: Path, mode: str, kernels: dict, name: str):
    from dataclasses import replace

    from trainer.fit import FitArgs
    from trainer.kernels import KERNELS

    return FitArgs(base=str(work / "llama8b"), data=work / "data.jsonl", r=R, load_4bit=mode == "qlora",
                   lr=lr_for(mode), batch_size=BATCH, max_seq_len=SEQ, packing=True, max_steps=STEPS,
                   eval_split=0.0, seed=SEED, out=work / "runs", name=name, overwrite=True,
                   kernels=replace(KERNELS, **kernels))


def step_rows(args):
    """The rows fit trains on, step by step: trainer.data.batches with fit's own seed."""
    from transformers import AutoTokenizer

    from trainer import data

    tok = AutoTokenizer.from_pretrained(args.base)
    ds = data.load(args.data_path, tok, max_seq_len=args.max_seq_len, eval_split=args.eval_split, seed=args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    it = data.batches(ds.train, batch_size=args.batch_size, max_seq_len=args.max_seq_len, packing=True,
                      pad_id=pad, rng=random.Random(args.seed * 1000))
    return [next(it) for _ in range(args.max_steps)], pad


# ---------------------------------------------------------------- systems


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def run_loraplex(work: Path, mode: str, kernels: dict) -> dict:
    import torch

    from trainer.fit import run

    args = fit_args(work, mode, kernels, f"loraplex-{mode}")
    result = run(args, progress=False)
    log = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    m = result.manifest["metrics"]
    return {"losses": result.losses, "step_tokens": [r["tokens"] for r in steps],
            "step_seconds": [r["seconds"] for r in steps], "peak_bytes": m["peak_memory_bytes"],
            "setup_bytes": m["setup_memory_bytes"], "plan_bytes": m["planned_memory_bytes"],
            "kernels_used": m["kernels"], "adapter": str(result.out_dir), "device_name": _device_name()}


def run_hf(work: Path, mode: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    args = fit_args(work, mode, {}, f"hf-{mode}")
    batches, pad = step_rows(args)
    rows = [{"input_ids": ids[:n], "labels": lab[:n], "position_ids": pos[:n]}
            for b in batches for ids, lab, pos, n in zip(b.input_ids, b.labels, b.position_ids,
                                                          map(sum, b.seq_lens))]

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        out = {k: [] for k in ("input_ids", "labels", "position_ids")}
        for x in items:
            p = width - len(x["input_ids"])
            out["input_ids"].append(x["input_ids"] + [pad] * p)
            out["labels"].append(x["labels"] + [-100] * p)
            out["position_ids"].append(x["position_ids"] + list(range(len(x["position_ids"]), width)))
        return {k: torch.tensor(v) for k, v in out.items()}

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    kwargs = {}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16, device_map={"": 0 if cuda else "cpu"},
                                                 **kwargs)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    set_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=args.dropout, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    setup_bytes = torch.cuda.memory_allocated() if cuda else 0

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self.t0 = [], [], 0.0

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class InOrder(Trainer):  # the rows in fit's order, not reshuffled
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    clock = Clock()
    targs = TrainingArguments(
        output_dir=str(work / "runs" / f"hf-{mode}"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=STEPS, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=int(STEPS * args.warmup_ratio), weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=True, optim="paged_adamw_8bit" if mode == "qlora" else "adamw_torch_fused",
        logging_steps=1, save_strategy="no", report_to=[], seed=SEED, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[clock])
    trainer.train()
    return {"losses": clock.losses, "step_tokens": [b.n_tokens for b in batches], "step_seconds": clock.seconds,
            "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
            "setup_bytes": setup_bytes, "plan_bytes": None, "device_name": _device_name()}


def run_one(work: Path, system: str, mode: str, kernels: dict, label: str | None) -> dict:
    t0 = time.perf_counter()
    out = run_loraplex(work, mode, kernels) if system == "loraplex" else run_hf(work, mode)
    tok, sec = out["step_tokens"][WARMUP_STEPS:], out["step_seconds"][WARMUP_STEPS:]
    gib = 2**30
    return {"system": system, "mode": mode, "label": label or ("default" if not kernels else json.dumps(kernels)),
            "kernels": kernels, "tokens_per_s": round(sum(tok) / sum(sec), 1),
            "tokens_per_s_all_steps": round(sum(out["step_tokens"]) / sum(out["step_seconds"]), 1),
            "peak_gib": round(out["peak_bytes"] / gib, 3),
            "plan_gib": round(out["plan_bytes"] / gib, 3) if out["plan_bytes"] else None,
            "setup_gib": round((out["setup_bytes"] or 0) / gib, 3), "losses": [round(x, 5) for x in out["losses"]],
            "step_seconds": [round(x, 4) for x in out["step_seconds"]], "wall_s": round(time.perf_counter() - t0, 1),
            **{k: out[k] for k in ("kernels_used", "device_name", "adapter") if k in out}}


# ---------------------------------------------------------------- report


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    got = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton", "vllm"):
        try:
            got[name] = version(name)
        except PackageNotFoundError:
            pass
    return got


def report(rows_file: Path, out: Path, command: str, shape: str = "llama-3.1-8b") -> None:
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu = None
    runs = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": {"gpu": gpu, "cpus": os.cpu_count()}, "versions": versions(),
                               "command": command, "workload": {"shape": shape, "r": R, "batch": BATCH,
                                                                "seq": SEQ, "steps": STEPS, "packing": True},
                               "runs": runs, "failed": failed}, indent=1))
    print(table(runs))


def table(runs: list[dict]) -> str:
    lines = [f"{'system':9} {'mode':6} {'label':34} {'tok/s':>8} {'peak GiB':>9} {'plan GiB':>9} {'loss 1':>8} "
             f"{'loss 20':>8}"]
    for r in runs:
        plan = f"{r['plan_gib']:.2f}" if r["plan_gib"] else "-"
        lines.append(f"{r['system']:9} {r['mode']:6} {r['label'][:34]:34} {r['tokens_per_s']:8.0f} {r['peak_gib']:9.2f} "
                     f"{plan:>9} {r['losses'][0]:8.4f} {r['losses'][-1]:8.4f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--shape", default="llama-3.1-8b", help="tiny: a few MB, to try the script on a CPU")
    b = sub.add_parser("run")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--system", choices=["loraplex", "hf"], required=True)
    b.add_argument("--mode", choices=["qlora", "lora16"], required=True)
    b.add_argument("--kernels", default="{}", help='JSON overrides of trainer.kernels.Kernels, e.g. {"liger": false}')
    b.add_argument("--label")
    b.add_argument("--rows", type=Path, required=True)
    b.add_argument("--timeout", type=int, default=420)
    c = sub.add_parser("report")
    c.add_argument("--rows", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--command", default="bash benchmarks/trainer_gpu.sh")
    c.add_argument("--shape", default="llama-3.1-8b", help="the base the rows were measured on (prepare's --shape)")
    w = sub.add_parser("_worker")
    w.add_argument("spec")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.work, args.shape)
    elif args.cmd == "run":
        # A child process per run: fresh CUDA statistics, and no run's patches or allocations leak into the next.
        spec = json.dumps({"work": str(args.work), "system": args.system, "mode": args.mode,
                           "kernels": json.loads(args.kernels), "label": args.label})
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "_worker", spec], capture_output=True, text=True,
                              timeout=args.timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines or not lines[-1].startswith("{"):
            sys.stderr.write(proc.stderr[-6000:])
            row = {"system": args.system, "mode": args.mode, "label": args.label, "error": proc.stderr[-2000:],
                   "wall_s": round(time.perf_counter() - t0, 1)}
        else:
            row = json.loads(lines[-1])
            print(table([row]).splitlines()[1], flush=True)
        with args.rows.open("a") as f:
            f.write(json.dumps(row) + "\n")
    elif args.cmd == "report":
        report(args.rows, args.out, args.command, args.shape)
    else:
        s = json.loads(args.spec)
        row = run_one(Path(s["work"]), s["system"], s["mode"], s["kernels"], s["label"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
