"""The LoRA / QLoRA recipe: setup -> fit -> evaluate -> save.

Every check that can fail on bad input (data, base, rank, targets, --4bit,
--out) runs in ``setup`` before a single file is written, so a refused run
leaves nothing behind. The adapter is written into a temporary sibling
directory, checked against the same rule book the server uses
(``server.adapters.compat``), and only then renamed into place.

Ctrl-C saves a checkpoint (adapter weights, optimizer, scheduler, step, RNG)
under ``<out>/checkpoint``; ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from server.adapters.compat import IncompatibleAdapter, Violation, ensure_servable, rank_violation
from trainer import base as base_mod
from trainer import checkpoint as checkpoint_mod
from trainer import data as data_mod
from trainer import kernels as kernels_mod
from trainer.kernels import KERNELS, Kernels
from trainer.model import Precision, choose_precision, load_base, lora_config, resolve_targets
from trainer.qlora import RECIPE, QLoRARecipe, bnb_skip_modules
from trainer import step as step_mod
from trainer.step import Forward

logger = logging.getLogger(__name__)

MANIFEST = "loraplex.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINT = "checkpoint"


class FitError(ValueError):
    """Bad input to fit, found before anything was written."""


@dataclass
class FitArgs:
    base: str = base_mod.DEFAULT_BASE
    """`smollm2-135m` (bundled) or a local Hugging Face model directory."""
    data: Path | None = None
    """JSONL training data; default: the bundled ISO-8601 demo set."""
    r: int = 16
    """LoRA rank. Higher: more capacity, more adapter memory per GPU slot."""
    alpha: int | None = None
    """LoRA alpha; default 2*r (scale alpha/r = 2)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter input. Above 0, PEFT copies every target's input for its mask:
    7 more activations a layer to keep and write. 0 is PEFT's, torchtune's and Unsloth's default."""
    targets: str = "all-linear"
    """`all-linear` or a comma list (q_proj,v_proj,...)."""
    load_4bit: bool = False
    """QLoRA: NF4 base with double quant; LoftQ-initialised adapter (see qlora.py)."""
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    packing: bool = False
    eval_split: float = 0.05
    seed: int = 0
    out: Path = Path("runs")
    name: str | None = None
    """Adapter name; default: the data file's stem (`iso-dates` for the demo)."""
    resume: bool = False
    overwrite: bool = False
    warmup_ratio: float = 0.03
    log_every: int = 1
    save_every: int = 0
    """Optimizer steps between checkpoints; 0: only on Ctrl-C."""
    recipe: QLoRARecipe = RECIPE
    """How --4bit trains (see trainer/qlora.py); ignored without --4bit."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides --epochs)."""
    kernels: Kernels = KERNELS
    """The CUDA fast paths (trainer/kernels.py) and the checkpointing mode (trainer/checkpoint.py)."""

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2 * self.r

    @property
    def data_path(self) -> Path:
        from trainer.demo.dates import TRAIN_FILE

        return Path(self.data) if self.data else TRAIN_FILE

    @property
    def adapter_name(self) -> str:
        if self.name:
            return self.name
        return "iso-dates" if self.data is None else self.data_path.stem.split(".")[0]

    @property
    def out_dir(self) -> Path:
        return Path(self.out) / self.adapter_name


@dataclass
class FitResult:
    out_dir: Path
    manifest: dict
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- setup


def _check_writable(out_dir: Path) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise FitError(f"--out {str(out_dir.parent)!r}: cannot write under {str(probe)!r}")


def validate_args(args: FitArgs) -> None:
    """Flag checks that need no model (so they run in milliseconds)."""
    if v := rank_violation(args.r, field="--r"):
        raise IncompatibleAdapter([v])
    checks = [
        (args.alpha is not None and args.alpha > 0, "--alpha", "must be > 0"),
        (0.0 <= args.dropout < 1.0, "--dropout", "must be in [0, 1)"),
        (args.epochs > 0, "--epochs", "must be > 0"),
        (args.lr > 0, "--lr", "must be > 0"),
        (args.batch_size >= 1, "--batch-size", "must be >= 1"),
        (args.grad_accum >= 1, "--grad-accum", "must be >= 1"),
        (args.max_seq_len >= 8, "--max-seq-len", "must be >= 8"),
        (args.max_steps is None or args.max_steps >= 1, "--max-steps", "must be >= 1"),
        (args.kernels.checkpointing in checkpoint_mod.MODES, "--checkpointing",
         f"must be one of {', '.join(checkpoint_mod.MODES)}"),
        (0.0 <= args.eval_split < 1.0, "--eval-split", "must be in [0, 1)"),
    ]
    for ok, flag, msg in checks:
        if not ok:
            raise FitError(f"{flag} {msg}")
    name = args.adapter_name
    if not name or "/" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise FitError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (no '/', no leading '.')")
    out_dir = args.out_dir
    _check_writable(out_dir)
    if args.resume:
        if not (out_dir / CHECKPOINT / "state.pt").is_file():
            raise FitError(f"--resume: no checkpoint in {out_dir / CHECKPOINT}")
    elif out_dir.exists() and not args.overwrite:
        raise FitError(f"--out: {out_dir} already exists (pass --overwrite to replace it, "
                       "or --resume to continue its checkpoint)")


@dataclass
class Setup:
    args: FitArgs
    base: base_mod.BaseModel
    precision: Precision
    tokenizer: object
    dataset: data_mod.Dataset
    targets: list[str]


def setup(args: FitArgs) -> Setup:
    from transformers import AutoTokenizer

    validate_args(args)
    try:
        base = base_mod.resolve(args.base)
    except base_mod.BaseModelError as e:
        raise FitError(str(e)) from None
    targets = resolve_targets(args.targets, base)
    precision = choose_precision(args.load_4bit)
    if args.load_4bit:
        from trainer.model import check_bitsandbytes

        check_bitsandbytes()
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    try:
        dataset = data_mod.load(args.data_path, tokenizer, max_seq_len=args.max_seq_len,
                                eval_split=args.eval_split, seed=args.seed)
    except data_mod.DataError as e:
        raise FitError(str(e)) from None
    if dataset.n_dropped_too_long:
        logger.warning("dropped %d of %d examples longer than --max-seq-len %d",
                       dataset.n_dropped_too_long, dataset.n_read, args.max_seq_len)
    return Setup(args, base, precision, tokenizer, dataset, targets)


# ---------------------------------------------------------------- fit


def _reset_peak_rss() -> bool:
    """Restart the kernel's resident high-water mark (VmHWM) at the current
    RSS, so that the peak read after the fit is the fit's own, not that of
    whatever the process did before (a test session, a notebook)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process_peak_rss"
    except OSError:
        pass
    # ru_maxrss is KiB on Linux and never resets: the process's lifetime peak.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_lifetime_peak_rss"


@torch.no_grad()
def eval_loss(forward: Forward, model, examples: list[data_mod.Example], *, batch_size: int,
              max_seq_len: int, pad_id: int) -> float | None:
    """Token-weighted mean loss over the target tokens."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data_mod.batches(examples, batch_size=batch_size, max_seq_len=max_seq_len,
                                  packing=False, pad_id=pad_id, rng=random.Random(0)):
        total += forward.loss_sum(batch).item()
        count += batch.n_targets
    model.train(was_training)
    return total / max(count, 1)


def _optimizer(params, args: FitArgs, precision: Precision):
    if precision.load_4bit and precision.device == "cuda":
        import bitsandbytes as bnb

        # Paged 8-bit AdamW: states in 8 bits, paged to host RAM under pressure (QLoRA paper).
        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=precision.device == "cuda")


def _prepare(s: Setup):
    """The base in the compute dtype (NF4 linears with --4bit), frozen, wrapped in a LoRA adapter,
    with the fast paths this host has (trainer/kernels.py) and activation checkpointing."""
    from peft import get_peft_model

    args, kernels, cuda = s.args, s.args.kernels, s.precision.device == "cuda"
    have = kernels_mod.available(s.precision.device)
    padding_free = kernels.varlen and have["varlen"] is None
    if padding_free:
        kernels_mod.register_varlen()
    model = load_base(s.base, s.precision, skip_modules=bnb_skip_modules(args.recipe),
                      attn_implementation=kernels_mod.VARLEN if padding_free else "sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)  # the adapter's initial A: the same whatever loading drew before
    model = get_peft_model(model, lora_config(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=s.targets))
    used = {"padding_free": padding_free, "liger": False, "fused_loss": kernels.fused_loss and cuda,
            "embedding_on_host": False}
    if kernels.liger and have["liger"] is None:
        used["liger"] = kernels_mod.apply_liger(model)
    used["lora_epilogue"] = kernels_mod.apply_lora_epilogue(model) if kernels.lora_epilogue and cuda else 0
    mode = checkpoint_mod.resolve(kernels.checkpointing, s.precision.device)
    checkpoint_mod.enable(model, mode)
    used["checkpointing"] = mode
    forward = Forward.of(model, device=s.precision.device, padding_free=padding_free, fused_loss=kernels.fused_loss,
                         autocast=s.precision.compute_dtype if cuda else None)
    if cuda and kernels.embed_on_host:
        used["embedding_on_host"] = forward.move_embedding_to_host() > 0
    model.train()
    return model, forward, used


def fit(s: Setup, *, progress: bool = True) -> FitResult:
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    args, out_dir = s.args, s.args.out_dir
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()

    model, forward, used = _prepare(s)
    setup_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else None

    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else s.tokenizer.eos_token_id
    n_batches = math.ceil(len(s.dataset.train) / args.batch_size) if not args.packing else None
    if n_batches is None:  # packing: count rows once with a fixed RNG
        n_batches = sum(1 for _ in data_mod.batches(s.dataset.train, batch_size=args.batch_size,
                                                    max_seq_len=args.max_seq_len, packing=True,
                                                    pad_id=pad_id, rng=random.Random(0)))
    steps_per_epoch = math.ceil(n_batches / args.grad_accum)
    total_steps = args.max_steps or max(1, math.ceil(steps_per_epoch * args.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, args, s.precision)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total_steps * args.warmup_ratio), total_steps)

    step, tokens_seen, train_time = 0, 0, 0.0
    losses: list[float] = []
    ckpt = out_dir / CHECKPOINT
    if args.resume:
        try:  # tensors and plain data only: a checkpoint never runs pickled code
            state = torch.load(ckpt / "state.pt", weights_only=True)
        except pickle.UnpicklingError as e:
            raise FitError(f"--resume: {ckpt / 'state.pt'} holds more than tensors and plain data, so it is not "
                           f"loaded ({str(e).splitlines()[0]})") from None
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, train_time, losses = state["step"], state["tokens"], state["time"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed at step %d/%d", step, total_steps)
    else:
        if out_dir.exists():  # --overwrite, checked in validate_args
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)

    def save_checkpoint() -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        tmp = out_dir / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
                  tmp / "adapter.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "tokens": tokens_seen, "time": train_time, "losses": losses,
                    "torch_rng": torch.get_rng_state(), "args": _jsonable(asdict(args))}, tmp / "state.pt")
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)

    def optimizer_steps():
        """Each optimizer step's micro-batches, in the same order on resume."""
        epoch = step // steps_per_epoch
        skip = (step - epoch * steps_per_epoch) * args.grad_accum
        while True:
            rng = random.Random(args.seed * 1000 + epoch)
            group: list[data_mod.Batch] = []
            for i, batch in enumerate(data_mod.batches(s.dataset.train, batch_size=args.batch_size,
                                                       max_seq_len=args.max_seq_len, packing=args.packing,
                                                       pad_id=pad_id, rng=rng)):
                if i < skip:
                    continue
                group.append(batch)
                if len(group) == args.grad_accum:
                    yield group
                    group = []
            epoch, skip = epoch + 1, 0  # an epoch's last group may be short: a step of its own
            if group:
                yield group

    log = (out_dir / METRICS_LOG).open("a")
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    interrupted = False
    try:
        for group in optimizer_steps():
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            losses.append(step_mod.backward(forward, group))
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            n_tokens = sum(b.n_tokens for b in group)
            train_time += dt
            tokens_seen += n_tokens
            tps = n_tokens / dt if dt else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:.0f}", refresh=False)
            bar.update()
            if step % args.log_every == 0:
                log.write(json.dumps({"step": step, "epoch": round(step / steps_per_epoch, 3),
                                      "loss": round(losses[-1], 5), "lr": scheduler.get_last_lr()[0],
                                      "tokens": n_tokens, "seconds": round(dt, 4), "tokens_per_s": round(tps, 1),
                                      "elapsed_s": round(train_time, 2)}) + "\n")
                log.flush()
            if args.save_every and step % args.save_every == 0:
                save_checkpoint()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if interrupted:
        # A second Ctrl-C while saving would leave a half-written checkpoint.tmp,
        # never a broken checkpoint/: the rename is the commit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        save_checkpoint()
        log.close()
        raise KeyboardInterrupt(f"interrupted at step {step}/{total_steps}; checkpoint saved in {ckpt} "
                                f"(continue with --resume)")

    peak, peak_kind = _peak_memory()  # the training step's peak, before evaluation allocates its own
    train_loss = eval_loss(forward, model, s.dataset.train[:256], batch_size=args.batch_size,
                           max_seq_len=args.max_seq_len, pad_id=pad_id)
    ev_loss = eval_loss(forward, model, s.dataset.eval, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                        pad_id=pad_id)
    log.write(json.dumps({"step": step, "train_loss": train_loss, "eval_loss": ev_loss}) + "\n")
    log.close()

    from trainer.plan import plan as make_plan

    # Plan for the batches this data actually makes: packed rows fill --max-seq-len; unpacked rows
    # are as wide as the longest example.
    widest = args.max_seq_len if args.packing else max(len(e.input_ids) for e in s.dataset.train)
    planned = make_plan(s.base.config, r=args.r, targets=s.targets, batch_size=args.batch_size,
                        seq_len=widest, load_4bit=args.load_4bit, compute_dtype=s.precision.compute_dtype,
                        device=s.precision.device, checkpointing=used["checkpointing"],
                        embedding_on_host=used["embedding_on_host"],
                        answer_fraction=sum(e.n_target for e in s.dataset.train) / max(1, s.dataset.train_tokens))
    metrics = {
        "train_loss": train_loss,
        "train_perplexity": math.exp(train_loss) if train_loss is not None else None,
        "eval_loss": ev_loss,
        "eval_perplexity": math.exp(ev_loss) if ev_loss is not None else None,
        "first_step_loss": losses[0] if losses else None,
        "steps": step,
        "tokens": tokens_seen,
        "train_seconds": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "setup_memory_bytes": setup_bytes,
        "planned_memory_bytes": planned.mode("qlora" if args.load_4bit else "lora").total,
        "kernels": used,
    }
    manifest = save(model, s, metrics)
    return FitResult(out_dir, manifest, losses)


# ---------------------------------------------------------------- save


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k not in ("recipe", "kernels")}


def save(model, s: Setup, metrics: dict) -> dict:
    """Write adapter + manifest to a temp dir, check it, then move it into place."""
    args, out_dir = s.args, s.args.out_dir
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "adapter_config.json").read_text())
        # The rule book the server applies at upload: never write what it would refuse.
        ensure_servable(config, architecture=s.base.architecture)
        from trainer.base import tokenizer_hash

        manifest = {
            "format": "loraplex-adapter/1",
            "name": args.adapter_name,
            "base": {"name": s.base.name, "fingerprint": s.base.fingerprint, "architecture": s.base.architecture},
            "tokenizer": {"hash": tokenizer_hash(s.tokenizer), "chat_template": s.tokenizer.chat_template},
            "training": {
                "args": _jsonable(asdict(args)),
                "precision": s.precision.label,
                "device": s.precision.device,
                "data": {"path": str(args.data_path), "format": s.dataset.format, "examples_read": s.dataset.n_read,
                         "train_examples": len(s.dataset.train), "eval_examples": len(s.dataset.eval),
                         "dropped_too_long": s.dataset.n_dropped_too_long},
                "qlora_recipe": args.recipe.as_dict() if args.load_4bit else None,
            },
            "metrics": metrics,
            "created_unix": int(time.time()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
    return manifest


def run(args: FitArgs, *, progress: bool = True) -> FitResult:
    """Setup, fit, evaluate, save. Leaves no output directory behind on bad input."""
    s = setup(args)
    created = not args.out_dir.exists()
    try:
        return fit(s, progress=progress)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if created and not args.resume and not (args.out_dir / CHECKPOINT).exists():
            shutil.rmtree(args.out_dir, ignore_errors=True)
        raise


__all__ = ["FitArgs", "FitError", "FitResult", "run", "setup", "fit", "IncompatibleAdapter", "Violation"]
