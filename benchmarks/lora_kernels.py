"""Tune vLLM's multi-LoRA Triton kernels (shrink and expand) for one card and one model shape.

vLLM 0.25.1 ships no tuned LoRA kernel configs: every shape runs one default. Its grids launch
one block per (token block, output block, slice, active adapter), and blocks of an adapter with
fewer tokens than the block's first row return at once. A decode batch of 128 sequences over 64
distinct adapters holds about two tokens per adapter, so nearly all of those blocks are empty,
and their count, not the adapter bytes read, sets the step time. This searches block sizes per
batch size with the real kernels on this card, timed inside CUDA graphs as the engine runs them,
and writes what wins in the format vLLM reads from ``VLLM_TUNED_CONFIG_FOLDER``
(``vllm/lora/ops/triton_ops/README_TUNING.md``):

    python benchmarks/lora_kernels.py --shape llama-3.1-8b --rank 16 --max-loras 128 --out DIR

DIR gets ``{GPU}_SHRINK.json``, ``{GPU}_EXPAND_TRUE.json`` (and ``_FALSE``, for vLLM's dual-stream
path) and ``lora_kernels.json``: every timing, and the LoRA time of one forward pass (all layers)
with vLLM's defaults and with the tuned configs, per batch size and distinct-adapter count.
A config is kept only where it is no slower than the default at any adapter count measured.
``--from lora_kernels.json`` chooses again from recorded timings, without a GPU.

Capture compiles the configs that decode batches use; one that only batches larger than any
CUDA graph use (prefill) is compiled by Triton the first time such a batch runs, once per
engine process (vLLM's JIT monitor logs "Triton kernel JIT compilation during inference").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.models import SHAPES  # noqa: E402
from server.engine.lora_kernels import BUNDLED, file_prefix, has_configs  # noqa: E402

BATCHES = (16, 64, 128, 256, 1024, 4096)
ADAPTERS = (1, 4, 16, 64, 128)
SLOWER_AT_MOST = 1.03
"""A tuned config may be this much slower than vLLM's default at some adapter count (timing noise)."""

SHRINK = [dict(block_m=bm, block_n=16, block_k=bk, split_k=sk, num_warps=4, num_ctas=1, num_stages=2,
               group_size_m=8, max_nreg=None)
          for bm in (16, 32, 64) for bk, sk in ((32, 8), (64, 8), (64, 16), (128, 16), (256, 16), (256, 64))]
EXPAND = [dict(block_m=bm, block_n=bn, block_k=16, num_warps=w, num_ctas=1, num_stages=2, max_nreg=None)
          for bm in (16, 32, 64, 128) for bn in (64, 128, 256) for w in (4, 8) if bm * bn <= 16384]


def modules(shape: dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The LoRA'd linear layers of one Llama block: name -> (input features, output slices)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (i, i)), "down": (i, (h,))}


def config_keys(op: str, k_in: int, slices: tuple[int, ...], rank: int) -> tuple[str, str, str]:
    """(num_slices, k, n) as vLLM's get_lora_op_configs looks them up for this layer."""
    if op == "shrink":
        return str(len(slices)), str(k_in), str(rank)
    return str(len(slices)), str(rank), str(max(slices))


def choose(timings: dict, default_key: str) -> str:
    """The candidate with the lowest mean log-time ratio to the default over the adapter counts,
    among those no slower than SLOWER_AT_MOST x the default at any of them.
    ``timings``: candidate -> {adapters: microseconds}."""
    base = timings[default_key]
    best, best_score = default_key, 0.0
    for key, t in timings.items():
        ratios = [t[a] / base[a] for a in base if a in t]
        if len(ratios) < len(base) or max(ratios) > SLOWER_AT_MOST:
            continue
        score = sum(math.log(r) for r in ratios) / len(ratios)
        if score < best_score:
            best, best_score = key, score
    return best


MAX_SLICES = 8
"""vLLM looks the slice count up by exact key (every other level by the nearest one): a model
with a layer of more slices than the tuned shape (olmo_hybrid's in_proj_qkvg has 4) would fail
at graph capture, so every count up to this gets the nearest tuned one's configs."""


def write_configs(out: Path, gpu: str, max_loras: int, chosen: dict) -> list[Path]:
    """``chosen``: (op, num_slices, m, k, n) -> config. Writes vLLM's
    ``config[max_loras + 1][num_slices][m][k][n]`` files (MAX_LORAS in the ops is the length of
    the active-id table, one more than --max-loras)."""
    files: dict[str, dict] = {}
    for (op, slices, m, k, n), cfg in sorted(chosen.items()):
        tree = files.setdefault(op, {}).setdefault(str(max_loras + 1), {})
        tree.setdefault(slices, {}).setdefault(str(m), {}).setdefault(k, {})[n] = cfg
    for tree in files.values():
        for by_slices in tree.values():
            tuned = sorted(int(k) for k in by_slices)
            for count in range(1, MAX_SLICES + 1):
                nearest = min(tuned, key=lambda t: (abs(t - count), -t))
                by_slices.setdefault(str(count), by_slices[str(nearest)])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for op, tree in files.items():
        names = [f"{gpu}_SHRINK.json"] if op == "shrink" else [f"{gpu}_EXPAND_TRUE.json", f"{gpu}_EXPAND_FALSE.json"]
        for name in names:
            (out / name).write_text(json.dumps(tree, indent=1, sort_keys=True))
            written.append(out / name)
    return written


def _bench(fn, reps: int = 10, rounds: int = 3) -> float:
    """Median microseconds of one call, replayed from a CUDA graph of ``reps`` calls."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    del graph
    return statistics.median(times)


BASELINES = ("vllm", "vllm_tuned")
"""Rows of vLLM's own launch, timed beside the work list; no candidates: "vllm" with vLLM's
default block sizes, "vllm_tuned" with those of the folder loraplex ships for the card (what the
engine ran before the work list)."""


def from_folder(folder: Path, op_type: str, *args, **kwargs) -> dict:
    """vLLM's own config lookup (``get_lora_op_configs``) in ``folder``, read afresh: both of its
    layers cache what they read, and the environment names no folder again afterwards."""
    from vllm.lora.ops.triton_ops import utils

    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(folder)
    utils.load_lora_op_config.cache_clear(), utils.get_lora_op_configs.cache_clear()
    try:
        return utils.get_lora_op_configs(op_type, *args, **kwargs)
    finally:
        del os.environ["VLLM_TUNED_CONFIG_FOLDER"]
        utils.load_lora_op_config.cache_clear(), utils.get_lora_op_configs.cache_clear()


def tune(shape: dict, rank: int, max_loras: int, budget_s: float, schedule: str = "worklist",
         shipped: Path | None = None) -> dict:
    import torch
    import vllm.lora.ops.triton_ops.lora_expand_op as expand_mod
    import vllm.lora.ops.triton_ops.lora_shrink_op as shrink_mod
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.utils import get_captured_lora_counts

    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ, "unset VLLM_TUNED_CONFIG_FOLDER: defaults are the baseline"
    vllm_configs = shrink_mod.get_lora_op_configs
    forced: dict[str, dict | str | None] = {"shrink": None, "expand": None}  # a config, "shipped" or vLLM's

    shipped_pick: dict[str, dict] = {}  # op -> the shipped config vLLM's lookup gave the last call

    def configs(op_type, *args, **kwargs):
        if forced[op_type] == "shipped":
            shipped_pick[op_type] = dict(from_folder(shipped, op_type, *args, **kwargs))
            return shipped_pick[op_type]
        return forced[op_type] or vllm_configs(op_type, *args, **kwargs)

    shrink_mod.get_lora_op_configs = expand_mod.get_lora_op_configs = configs
    mods = {"shrink": shrink_mod, "expand": expand_mod}
    launches = {op: {"vllm": getattr(mod, f"_lora_{op}_kernel")} for op, mod in mods.items()}
    if schedule == "worklist":
        from server.engine.vllm_patches import LAUNCH_ENV, patch_lora_worklist

        os.environ[LAUNCH_ENV] = "worklist"
        for op, mod in mods.items():
            assert patch_lora_worklist(op, mod), f"vLLM's {op} kernel no longer takes the work-list launch"
            launches[op]["worklist"] = getattr(mod, f"_lora_{op}_kernel")

    def use(op: str, launch: str) -> None:
        setattr(mods[op], f"_lora_{op}_kernel", launches[op][launch])

    worst_diff = 0.0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # the active-adapter counts as the engine rounds them under --specialize-active-lora
    meta = LoRAKernelMeta.make(max_loras, max(BATCHES), dev,
                               captured_lora_counts=get_captured_lora_counts(max_loras, True))
    t0 = time.monotonic()
    timings: dict = {}  # (module, op, m) -> candidate -> adapters -> us
    layers = modules(shape)
    for done, (name, (k_in, slices)) in enumerate(layers.items()):
        deadline = t0 + budget_s * (done + 1) / len(layers)  # each layer gets its share of the budget
        a = tuple(torch.randn(max_loras, 1, rank, k_in, dtype=torch.bfloat16, device=dev) * 0.01 for _ in slices)
        b = tuple(torch.randn(max_loras, 1, n, rank, dtype=torch.bfloat16, device=dev) * 0.01 for n in slices)
        x = torch.randn(max(BATCHES), k_in, dtype=torch.bfloat16, device=dev)
        y = torch.zeros(max(BATCHES), sum(slices), dtype=torch.bfloat16, device=dev)
        for m in BATCHES:
            buf = torch.zeros(len(slices), m, rank, dtype=torch.float32, device=dev)  # [slices, m, r]
            # a prefill-sized batch holds a few prompts, with decodes of up to 64 adapters beside them
            for adapters in (n for n in ADAPTERS if n <= m and (m <= 256 or n <= 64)):
                ids = torch.randperm(max_loras, device=dev)[:adapters].to(torch.int32)
                mapping = ids[torch.randperm(m, device=dev) % adapters]  # [m]: each token's slot
                meta.prepare_tensors(mapping)
                args = meta.meta_args(m, True)
                calls = {
                    "shrink": lambda: lora_shrink(x[:m], a, buf, *args, 1.0),
                    "expand": lambda: lora_expand(buf, b, y[:m], *args, offset_start=0, add_inputs=True),
                }
                if schedule == "worklist":  # the same answer as vLLM's launch, or no timing at all
                    results = []
                    for launch in ("vllm", "worklist"):
                        use("shrink", launch), use("expand", launch)
                        buf.zero_(), y.zero_()
                        calls["shrink"](), calls["expand"]()
                        results.append((buf.clone(), y[:m].float().clone()))
                    for got, want in zip(results[1], results[0]):
                        diff = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                        worst_diff = max(worst_diff, diff)
                        if diff > 1e-2:
                            raise SystemExit(f"{name} m={m} adapters={adapters}: the work-list launch differs "
                                             f"from vLLM's by {diff:.3g} of the largest value")
                for op, candidates in (("shrink", SHRINK), ("expand", EXPAND)):
                    row = timings.setdefault((name, op, m), {})
                    forced[op] = None
                    reps = 10 if m <= 256 else 3
                    if schedule == "worklist":  # vLLM as it runs without loraplex: its launch and config
                        use(op, "vllm")
                        row.setdefault("vllm", {})[adapters] = _bench(calls[op], reps)
                        if shipped:  # and as loraplex ran it before the work list
                            forced[op] = "shipped"
                            row.setdefault("vllm_tuned", {})[adapters] = _bench(calls[op], reps)
                            forced[op] = None
                        use(op, "worklist")
                    row.setdefault("default", {})[adapters] = _bench(calls[op], reps)
                    # the shipped config is tried first, and past the deadline too: a budget that
                    # ends early still leaves the work list no worse off than vLLM's tuned launch
                    first = [shipped_pick.pop(op)] if op in shipped_pick else []
                    for cfg in first + [c for c in candidates if c not in first]:
                        if time.monotonic() > deadline and cfg not in first:
                            continue
                        forced[op] = cfg
                        key = json.dumps(cfg, sort_keys=True)
                        try:
                            row.setdefault(key, {})[adapters] = _bench(calls[op], reps)
                        except Exception as e:  # a config the card cannot run (shared memory, registers)
                            row.setdefault(key, {})[adapters] = float("inf")
                            print(f"  {name} {op} {key}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    forced[op] = None
        print(f"{name}: measured in {time.monotonic() - t0:.0f} s", flush=True)
    return {"timings": timings, "seconds": time.monotonic() - t0, "worst_relative_diff": worst_diff}


def report(shape: dict, rank: int, max_loras: int, timings: dict, default_of) -> tuple[dict, dict]:
    """(configs for write_configs, summary). ``timings``: (module, op, m) -> candidate -> adapters
    -> us. ``default_of(op, m, slices)`` is vLLM's default config. Every key is written, a default
    pick too, so vLLM's nearest-key lookup never lands on another layer's config. Layers sharing
    a key (o_proj and down_proj's expand) are chosen on their summed time."""
    mods = modules(shape)

    def key_of(name: str, op: str, m: int) -> tuple:
        k_in, slices = mods[name]
        n_slices, k, n = config_keys(op, k_in, slices, rank)
        return op, n_slices, m, k, n

    members: dict = {}  # (op, slices, m, k, n) -> the timed rows of the layers that share it
    for (name, op, m), row in timings.items():
        members.setdefault(key_of(name, op, m), []).append(row)
    grouped: dict = {}  # (op, slices, m, k, n) -> candidate -> adapters -> summed us
    for key, rows in members.items():
        counts = set(rows[0]["default"])
        for cand in (c for c in rows[0] if c not in BASELINES):  # vLLM's own launch is no candidate
            # a candidate counts only where it was timed for every layer of the key at every
            # adapter count (the budget may end between o_proj and down_proj)
            if all(set(r.get(cand, {})) >= counts for r in rows):
                grouped.setdefault(key, {})[cand] = {a: sum(r[cand][a] for r in rows) for a in counts}
    picked = {key: choose(row, "default") for key, row in grouped.items()}
    chosen = {key: default_of(key[0], key[2], int(key[1])) if c == "default" else json.loads(c)
              for key, c in picked.items()}
    layers = shape["num_hidden_layers"]
    per_pass = {}
    for (name, op, m), row in timings.items():
        pick = picked[key_of(name, op, m)]
        for adapters, us in row["default"].items():
            cell = per_pass.setdefault(f"m={m} adapters={adapters}", {"default_ms": 0.0, "tuned_ms": 0.0})
            cell["default_ms"] += us * layers / 1000
            cell["tuned_ms"] += row[pick][adapters] * layers / 1000  # choose() picks only fully timed ones
            for base in BASELINES:
                if adapters in row.get(base, {}):
                    cell[f"{base}_ms"] = cell.get(f"{base}_ms", 0.0) + row[base][adapters] * layers / 1000
    for cell in per_pass.values():
        cell["speedup"] = round(cell["default_ms"] / cell["tuned_ms"], 2)
        for base in BASELINES:
            if f"{base}_ms" in cell:
                cell[f"vs_{base}"] = round(cell[f"{base}_ms"] / cell["tuned_ms"], 2)
        for k in ("default_ms", "tuned_ms", *(f"{base}_ms" for base in BASELINES)):
            if k in cell:
                cell[k] = round(cell[k], 3)
    return chosen, {"lora_ms_per_forward_pass": per_pass,
                    "chosen": {"/".join(map(str, k)): v for k, v in picked.items()}}


def vllm_default(rank: int, max_loras: int):
    """vLLM's default config for (op, m, num_slices): what it runs without a tuned folder."""
    from vllm.lora.ops.triton_ops.utils import get_lora_op_configs

    assert not os.environ.get("VLLM_TUNED_CONFIG_FOLDER"), "unset VLLM_TUNED_CONFIG_FOLDER to read vLLM's defaults"

    def default_of(op: str, m: int, slices: int) -> dict:
        return dict(get_lora_op_configs(op, max_loras + 1, m, 4096, rank, slices,
                                        add_inputs=True if op == "expand" else None))

    return default_of


def _timings_doc(timings: dict) -> dict:
    return {f"{n}/{op}/m={m}": {c: {str(k): round(v, 2) for k, v in t.items()} for c, t in row.items()}
            for (n, op, m), row in timings.items()}


def _timings_from_doc(doc: dict) -> dict:
    out = {}
    for key, row in doc.items():
        name, op, m = key.split("/")
        out[(name, op, int(m.removeprefix("m=")))] = {c: {int(a): us for a, us in t.items()} for c, t in row.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=128, help="the engine's --max-loras (slots)")
    p.add_argument("--budget-s", type=float, default=300, help="stop trying candidates after this long")
    p.add_argument("--schedule", choices=("worklist", "vllm"), default="worklist",
                   help="tune the kernels as loraplex launches them (over the adapters' token blocks, "
                        "timing vLLM's own launch beside them as 'vllm_ms') or as vLLM does")
    p.add_argument("--against", type=Path, default=BUNDLED,
                   help="with --schedule worklist, also time vLLM's launch with this folder's configs for "
                        "the card ('vllm_tuned_ms'; default: the ones loraplex ships, where it has them)")
    p.add_argument("--from", dest="source", type=Path,
                   help="choose again from the timings of an earlier run's lora_kernels.json (no GPU)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.source:
        doc = json.loads(a.source.read_text())
        a.shape, a.rank, a.max_loras = doc["shape"], doc["rank"], doc["max_loras"]
        timings = _timings_from_doc(doc["timings_us"])
    else:
        import torch
        import vllm

        shipped = a.against if has_configs(a.against, torch.cuda.get_device_name()) else None
        result = tune(SHAPES[a.shape], a.rank, a.max_loras, a.budget_s, a.schedule, shipped)
        timings = result["timings"]
        doc = {"hardware": torch.cuda.get_device_name(), "schedule": a.schedule,
               "worst_relative_diff_vs_vllm": result["worst_relative_diff"],
               "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
               "vllm_tuned_from": str(shipped) if shipped else None,
               "command": " ".join(["python", "benchmarks/lora_kernels.py", *sys.argv[1:]]),
               "shape": a.shape, "rank": a.rank, "max_loras": a.max_loras, "seconds": round(result["seconds"], 1)}
    chosen, summary = report(SHAPES[a.shape], a.rank, a.max_loras, timings, vllm_default(a.rank, a.max_loras))
    files = write_configs(a.out, file_prefix(doc["hardware"]), a.max_loras, chosen)
    doc = {**doc, **summary, "timings_us": _timings_doc(timings)}
    if a.source:
        doc["rechosen"] = " ".join(["python", "benchmarks/lora_kernels.py", *sys.argv[1:]])
    (a.out / "lora_kernels.json").write_text(json.dumps(doc, indent=1))
    for k, cell in sorted(summary["lora_ms_per_forward_pass"].items(), key=lambda kv: kv[0]):
        vs = f"  vLLM's launch {cell['vllm_ms']:8.3f} ms ({cell['vs_vllm']}x)" if "vllm_ms" in cell else ""
        if "vllm_tuned_ms" in cell:
            vs += f", tuned {cell['vllm_tuned_ms']:8.3f} ms ({cell['vs_vllm_tuned']}x)"
        print(f"{k:>24}: {cell['default_ms']:8.3f} ms -> {cell['tuned_ms']:8.3f} ms  ({cell['speedup']}x){vs}")
    print("wrote", *[f.name for f in files])


if __name__ == "__main__":
    main()
