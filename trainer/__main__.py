"""python -m trainer: make LoRA / QLoRA adapters that loraplex (vLLM) can serve.

    python -m trainer plan --r 16 --4bit        # memory: full FT vs LoRA vs QLoRA
    python -m trainer fit --r 16 --4bit         # train on the bundled demo (ISO dates)
    python -m trainer eval runs/iso-dates       # base vs base+adapter on held-out data
    python -m trainer export runs/iso-dates --merge --out merged/
    python -m trainer push runs/iso-dates --url http://127.0.0.1:8000 --key $KEY
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from server.adapters.compat import IncompatibleAdapter

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train LoRA/QLoRA adapters that the loraplex server can serve.")
logger = logging.getLogger("trainer")

BaseOpt = Annotated[str, typer.Option(help="'smollm2-135m' (bundled) or a local Hugging Face model directory.")]
Opt = typer.Option
CHECKPOINTING_HELP = ("Activation checkpointing: 'off' keeps every activation (fastest, most memory); 'layers' keeps "
                      "each decoder layer's input and recomputes the layer in backward; 'offload' also keeps those "
                      "inputs in pinned host memory; 'auto': offload on CUDA, off on CPU.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _user_errors():
    from trainer.base import BaseModelError
    from trainer.data import DataError
    from trainer.fit import FitError
    from trainer.model import QuantizationUnavailable

    return (FitError, DataError, BaseModelError, IncompatibleAdapter, QuantizationUnavailable)


@app.command()
def fit(
    base: BaseOpt = "smollm2-135m",
    data: Annotated[Optional[Path], Opt(help="JSONL: chat, alpaca, prompt/completion or text. Default: bundled ISO-date demo.")] = None,
    r: Annotated[int, Opt("--r", help="LoRA rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512. Higher: more capacity, bigger GPU slot.")] = 16,
    alpha: Annotated[Optional[int], Opt(help="LoRA alpha (default 2*r).")] = None,
    dropout: Annotated[float, Opt(help="LoRA dropout on the adapter input. Above 0 every target's input is copied for "
                                       "its mask: more memory and time.")] = 0.0,
    targets: Annotated[str, Opt(help="'all-linear' or comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.")] = "all-linear",
    load_4bit: Annotated[bool, Opt("--4bit", help="QLoRA: NF4 base with double quant, paged 8-bit AdamW on CUDA.")] = False,
    epochs: Annotated[float, Opt(help="Passes over the training data (fractions allowed).")] = 1.0,
    lr: Annotated[Optional[float], Opt(help="Peak learning rate (cosine decay, 3% warmup). Default 2e-4; with --4bit 5e-4 (trainer/qlora.py).")] = None,
    batch_size: Annotated[int, Opt(help="Sequences per micro-batch.")] = 8,
    grad_accum: Annotated[int, Opt(help="Micro-batches per optimizer step.")] = 1,
    max_seq_len: Annotated[int, Opt(help="Longer examples are dropped (and counted), never truncated.")] = 256,
    packing: Annotated[bool, Opt(help="Lay short examples end to end (block-diagonal attention).")] = False,
    eval_split: Annotated[float, Opt(help="Fraction held out for eval loss.")] = 0.05,
    seed: int = 0,
    out: Annotated[Path, Opt(help="Parent directory; the adapter goes to OUT/NAME.")] = Path("runs"),
    name: Annotated[Optional[str], Opt(help="Adapter name (default: data file stem, 'iso-dates' for the demo).")] = None,
    resume: Annotated[bool, Opt(help="Continue from OUT/NAME/checkpoint (Ctrl-C writes one).")] = False,
    overwrite: Annotated[bool, Opt(help="Replace an existing OUT/NAME.")] = False,
    save_every: Annotated[int, Opt(help="Checkpoint every N optimizer steps (0: only on Ctrl-C).")] = 0,
    max_steps: Annotated[Optional[int], Opt(help="Stop after N optimizer steps (overrides --epochs).")] = None,
    checkpointing: Annotated[str, Opt(help=CHECKPOINTING_HELP)] = "auto",
) -> None:
    """Train a LoRA (or, with --4bit, QLoRA) adapter and write it with a loraplex.json manifest."""
    from trainer.fit import FitArgs, run

    if lr is None:
        from trainer.qlora import RECIPE

        lr = RECIPE.lr if load_4bit else 2e-4
    from trainer.kernels import KERNELS

    args = FitArgs(base=base, data=data, r=r, alpha=alpha, dropout=dropout, targets=targets, load_4bit=load_4bit,
                   epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len,
                   packing=packing, eval_split=eval_split, seed=seed, out=out, name=name, resume=resume,
                   overwrite=overwrite, save_every=save_every, max_steps=max_steps,
                   kernels=replace(KERNELS, checkpointing=checkpointing))
    try:
        result = run(args)
    except _user_errors() as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        typer.echo(f"\n{e}", err=True)
        raise typer.Exit(130)
    m = result.manifest["metrics"]
    typer.echo(f"adapter written to {result.out_dir}")
    typer.echo(f"  loss {m['first_step_loss']:.4f} (first step) -> train {m['train_loss']:.4f}"
               + (f", eval {m['eval_loss']:.4f} (ppl {m['eval_perplexity']:.3f})" if m["eval_loss"] is not None else ""))
    typer.echo(f"  {m['steps']} steps, {m['tokens']} tokens in {m['train_seconds']:.0f} s ({m['tokens_per_s']:.0f} tokens/s)")
    typer.echo(f"  peak memory: planned {m['planned_memory_bytes'] / 2**20:.0f} MiB, "
               f"measured {m['peak_memory_bytes'] / 2**20:.0f} MiB ({m['peak_memory_kind']})")


@app.command()
def plan(
    base: BaseOpt = "smollm2-135m",
    r: Annotated[int, Opt("--r")] = 16,
    targets: str = "all-linear",
    batch_size: int = 8,
    max_seq_len: int = 256,
    load_4bit: Annotated[bool, Opt("--4bit", help="Plan for the CUDA QLoRA path's optimizer when on CUDA.")] = False,
    device: Annotated[Optional[str], Opt(help="cpu or cuda (default: this host).")] = None,
    checkpointing: Annotated[str, Opt(help=CHECKPOINTING_HELP)] = "auto",
    answer_fraction: Annotated[float, Opt(help="Share of tokens that have a loss target (answer tokens): only "
                                               "those rows go through the LM head.")] = 1.0,
) -> None:
    """Print the memory breakdown of full fine-tuning vs LoRA vs QLoRA for BASE, as fit would allocate it.

    weights: parameters in the compute dtype (bf16 on CUDA, fp32 on CPU), target linears in NF4 with
    --4bit; on CUDA an untied input embedding stays in host memory. adapter: LoRA A and B in fp32,
    plus their bf16 copies under autocast on CUDA. gradients: fp32 per adapter weight. optimizer:
    AdamW's two fp32 moments, or paged 8-bit AdamW (QLoRA on CUDA). activations: what autograd keeps
    for backward: all layers without checkpointing; each layer's input (on the host when offloaded)
    plus one recomputed layer with it; and the final norm and the answer tokens' rows for the loss.
    On CUDA the total is what torch.cuda.max_memory_allocated reports at the step's peak.
    """
    import torch

    from server.adapters.compat import rank_violation
    from trainer import checkpoint as checkpoint_mod
    from trainer.base import BaseModelError, resolve
    from trainer.kernels import KERNELS
    from trainer.model import choose_precision, resolve_targets
    from trainer.plan import plan as make_plan

    try:
        if v := rank_violation(r, field="--r"):
            raise IncompatibleAdapter([v])
        b = resolve(base)
        t = resolve_targets(targets, b)
        dev = device or choose_precision(load_4bit).device
        mode = checkpoint_mod.resolve(checkpointing, dev)
    except (BaseModelError, IncompatibleAdapter, ValueError) as e:
        _fail(str(e))
    dtype = (torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16) \
        if dev == "cuda" else torch.float32
    p = make_plan(b.config, r=r, targets=t, batch_size=batch_size, seq_len=max_seq_len, load_4bit=load_4bit,
                  compute_dtype=dtype, device=dev, checkpointing=mode,
                  embedding_on_host=dev == "cuda" and KERNELS.embed_on_host, answer_fraction=answer_fraction)
    typer.echo(f"{b.name}: {p.shape.params / 1e6:.1f}M params ({p.shape.linear_params / 1e6:.1f}M in target-able "
               f"linears), adapter r={r} on {','.join(t)}: {p.shape.adapter_params(r, t) / 1e6:.2f}M params")
    typer.echo(f"device {dev}, compute dtype {str(dtype).removeprefix('torch.')}, batch {batch_size} x {max_seq_len} "
               f"tokens, checkpointing {mode}" + (", input embedding in host memory" if p.embedding_on_host else "")
               + "\n")
    typer.echo(p.table())


@app.command("eval")
def eval_(
    adapter: Annotated[Optional[Path], typer.Argument(help="Adapter directory (omit to evaluate the base only).")] = None,
    data: Annotated[Optional[Path], Opt(help="Held-out JSONL (default: the demo's held-out set).")] = None,
    base: Annotated[Optional[str], Opt(help="Base (default: the one the adapter's manifest names).")] = None,
    load_4bit: Annotated[Optional[bool], Opt("--4bit/--16bit", help="Base precision (default: as trained).")] = None,
    limit: Annotated[int, Opt(help="Evaluate the first N examples.")] = 200,
    max_seq_len: int = 256,
) -> None:
    """Loss, perplexity and exact-match of the base and of base+adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from server.adapters.compat import ensure_same_base
    from trainer.base import BaseModelError, resolve
    from trainer.demo.dates import EVAL_FILE
    from trainer.evaluate import evaluate, load_for_eval, read_manifest

    try:
        manifest = None
        if adapter is not None:
            if not (adapter / "adapter_config.json").is_file():
                raise BaseModelError(f"ADAPTER {str(adapter)!r}: no adapter_config.json there")
            manifest = read_manifest(adapter)
        b = resolve(base or (manifest or {}).get("base", {}).get("name") or "smollm2-135m")
        if manifest:
            ensure_same_base(manifest["base"]["fingerprint"], b.fingerprint)
        four = load_4bit if load_4bit is not None else bool(manifest and manifest["training"]["args"]["load_4bit"])
        path = data or EVAL_FILE
        tok = AutoTokenizer.from_pretrained(b.path)
        model = load_for_eval(b, load_4bit=four)
        prec = "nf4" if four else "16-bit"
        reports = [evaluate(model, tok, path, label=f"base ({prec})", limit=limit, max_seq_len=max_seq_len)]
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
            reports.append(evaluate(model, tok, path, label=f"base ({prec}) + {adapter.name}", limit=limit,
                                    max_seq_len=max_seq_len))
    except _user_errors() as e:
        _fail(str(e))
    for rep in reports:
        typer.echo(rep.row())
        for prompt, want, got in rep.samples:
            typer.echo(f"    ...{prompt!r}: want {want!r}, got {got!r}")
    if len(reports) == 2:
        typer.echo(f"exact-match change: {100 * (reports[1].exact_match - reports[0].exact_match):+.1f} points")


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory.")],
    out: Annotated[Path, Opt(help="Where to write the merged model.")],
    merge: Annotated[bool, Opt(help="Merge the adapter into the 16-bit base (the only export so far).")] = False,
    base: Annotated[Optional[str], Opt(help="Base (default: the adapter manifest's).")] = None,
) -> None:
    """Write a merged full model in bf16 (merged into the unquantized base weights)."""
    from trainer.base import BaseModelError
    from trainer.export import ExportError, merge_adapter

    if not merge:
        _fail("--merge is required (export writes a merged bf16 model)")
    try:
        warning = merge_adapter(adapter, out, base=base)
    except (ExportError, BaseModelError, IncompatibleAdapter) as e:
        _fail(str(e))
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"merged model written to {out}")


@app.command()
def push(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (as written by fit).")],
    url: Annotated[str, Opt(help="Server base URL.")] = "http://127.0.0.1:8000",
    key: Annotated[Optional[str], Opt(envvar="LORAPLEX_API_KEY", help="API key (or LORAPLEX_API_KEY).")] = None,
    name: Annotated[Optional[str], Opt(help="Adapter name on the server (default: the directory name).")] = None,
    replace: Annotated[bool, Opt(help="If the name exists, upload a new version (hot replace).")] = False,
    tenant: Annotated[Optional[str], Opt(help="Admin keys only: upload into this tenant.")] = None,
) -> None:
    """Upload ADAPTER to a running loraplex server; it is then served as model='<base>:<name>'."""
    from trainer.push import PushError
    from trainer.push import push as do_push

    if not key:
        _fail("--key (or LORAPLEX_API_KEY) is required")
    try:
        card = do_push(adapter, url=url, key=key, name=name or adapter.name, replace=replace, tenant=tenant)
    except PushError as e:
        _fail(str(e))
    typer.echo(f"pushed {card['id']} v{card['version']} ({card['digest'][:19]}...) -> model={card['model']!r}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes logs a hub-kernel lookup failure on CPU; its own kernels are used.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    sys.exit(main())
