"""S-LoRA-style load generator over the OpenAI API (the official async `openai` client).

Requests pick a model from a list (a base and/or adapters) by power-law
popularity (p_i ~ 1/(i+1)^alpha, S-LoRA's workload) or uniformly, arrive as a
Poisson process at rate R or from C closed-loop clients, and stream their
completions so time to first token is measured where a user would see it.
Prompts are token ids (the completions API takes them), so input length is
exact and identical across the systems compared. ``--kinds`` mixes in text
prompts and /v1/chat/completions, streamed or not, which make the server
tokenize and render the chat template (their input length is approximate:
one random common word is about one token).

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/v1 --key KEY \
        --models base base:a0 base:a1 --alpha 1 --concurrency 8 --duration 60
    python benchmarks/loadgen.py ... --requests 400 --kinds completions:ids:stream completions:text chat:stream chat
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Workload:
    models: tuple[str, ...]
    alpha: float | None = 1.0
    """Power-law exponent of model popularity; None: uniform."""
    rate: float | None = None
    """Poisson arrivals per second; None: closed loop with `concurrency` clients."""
    concurrency: int = 8
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (64, 64)
    ignore_eos: bool = True
    duration: float = 60.0
    vocab: int = 32000
    seed: int = 0
    kinds: tuple[str, ...] = ("completions:ids:stream",)
    """Request shapes, taken in turn: ``completions`` or ``chat``, ``:ids`` or ``:text`` prompt
    (chat is always text), ``:stream`` to stream. Non-streamed requests have no TTFT."""
    requests: int | None = None
    """Closed loop only: stop after this many requests instead of after ``duration``."""

    def weights(self) -> np.ndarray:
        n = len(self.models)
        w = np.ones(n) if self.alpha is None else 1.0 / np.arange(1, n + 1) ** self.alpha
        return w / w.sum()


@dataclass
class Record:
    model: str
    start: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class Summary:
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: dict
    tpot_s: dict
    e2e_s: dict
    error_samples: list[str] = field(default_factory=list)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize(records: list[Record], wall: float) -> Summary:
    ok = [r for r in records if r.error is None]
    return Summary(
        requests=len(ok), errors=len(records) - len(ok), duration_s=wall,
        requests_per_s=len(ok) / wall, output_tokens_per_s=sum(r.output_tokens for r in ok) / wall,
        ttft_s=percentiles([r.ttft for r in ok if r.ttft is not None]),
        tpot_s=percentiles([r.tpot for r in ok if r.tpot is not None]),
        e2e_s=percentiles([r.e2e for r in ok if r.e2e is not None]),
        error_samples=sorted({r.error for r in records if r.error})[:5],
    )


# Text prompts: random common words, about one token each for the usual BPE vocabularies.
WORDS = ("the of and to in is was for on that with as by at from his her they this which have had not are but one "
         "all were when we there can an their said more time been if would who will about so what up out into some "
         "them only other new these two may first then do any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should because each just those "
         "people how too little state good very make world still own see men work long get here between both life "
         "being under never day same another know while last might us great old year off come since against go came "
         "right used take three").split()


def parse_kind(kind: str) -> tuple[str, bool, bool]:
    """``completions:ids:stream`` -> (api, text prompt?, stream?)."""
    api, *opts = kind.split(":")
    if api not in ("completions", "chat") or not set(opts) <= {"ids", "text", "stream"} or {"ids", "text"} <= set(opts):
        raise ValueError(f"bad request kind {kind!r}: completions|chat[:ids|:text][:stream]")
    if api == "chat" and "ids" in opts:
        raise ValueError(f"bad request kind {kind!r}: chat prompts are text")
    return api, api == "chat" or "text" in opts, "stream" in opts


class Generator:
    def __init__(self, url: str, key: str, w: Workload):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        self.w = w
        self.rng = random.Random(w.seed)
        self.np_rng = np.random.default_rng(w.seed)
        self.p = w.weights()
        self.kinds = [parse_kind(k) for k in w.kinds]
        self.issued = 0

    def _request(self) -> tuple[str, list[int] | str, int, tuple[str, bool, bool]]:
        model = self.w.models[int(self.np_rng.choice(len(self.w.models), p=self.p))]
        kind = self.kinds[self.issued % len(self.kinds)]
        self.issued += 1
        n_in = self.rng.randint(*self.w.input_len)
        if kind[1]:
            prompt = " ".join(self.rng.choice(WORDS) for _ in range(n_in))
        else:
            prompt = [self.rng.randrange(100, self.w.vocab - 100) for _ in range(n_in)]
        return model, prompt, self.rng.randint(*self.w.output_len), kind

    def _more(self, deadline: float) -> bool:
        if self.w.requests is not None:
            return self.issued < self.w.requests
        return time.perf_counter() < deadline

    async def one(self, model: str, prompt: list[int] | str, n_out: int,
                  kind: tuple[str, bool, bool] = ("completions", False, True)) -> Record:
        api, _, stream = kind
        rec = Record(model, time.perf_counter())
        common = dict(model=model, max_tokens=n_out, temperature=0, stream=stream,
                      extra_body={"ignore_eos": self.w.ignore_eos})
        if stream:
            common["stream_options"] = {"include_usage": True}
        try:
            if api == "chat":
                resp = await self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                                 **common)
            else:
                resp = await self.client.completions.create(prompt=prompt, **common)
            if stream:
                async for chunk in resp:
                    if rec.ttft is None and chunk.choices:
                        c = chunk.choices[0]
                        if (c.delta.content if api == "chat" else c.text):
                            rec.ttft = time.perf_counter() - rec.start
                    if chunk.usage is not None:
                        rec.output_tokens = chunk.usage.completion_tokens
            else:
                rec.output_tokens = resp.usage.completion_tokens
            rec.e2e = time.perf_counter() - rec.start
        except Exception as e:  # every failure is counted and reported, never retried
            rec.error = f"{type(e).__name__}: {str(e)[:200]}"
        return rec

    async def run(self) -> tuple[list[Record], float]:
        records: list[Record] = []
        t0 = time.perf_counter()
        deadline = t0 + self.w.duration
        if self.w.rate is None:
            async def client_loop():
                while self._more(deadline):
                    records.append(await self.one(*self._request()))
            await asyncio.gather(*(client_loop() for _ in range(self.w.concurrency)))
        else:
            tasks = []
            t = t0
            while True:
                t += self.rng.expovariate(self.w.rate)
                if t >= deadline:
                    break
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                tasks.append(asyncio.create_task(self.one(*self._request())))
            records = list(await asyncio.gather(*tasks))
        return records, time.perf_counter() - t0


def _run_one(url: str, key: str, w: Workload) -> tuple[list[Record], float]:
    return asyncio.run(Generator(url, key, w).run())


def run(url: str, key: str, w: Workload, processes: int = 1) -> tuple[Summary, list[Record]]:
    """Drive the workload from ``processes`` client processes (one asyncio loop each).

    At hundreds of streams one Python process parsing SSE chunks can become the
    bottleneck and flatten every system to the client's speed; more processes keep
    the load generator out of the measurement. Concurrency (or the Poisson rate) is
    split between them; each gets its own seed.
    """
    if processes <= 1:
        records, wall = _run_one(url, key, w)
        return summarize(records, wall), records
    import multiprocessing as mp
    from dataclasses import replace

    parts = []
    for i in range(processes):
        c = w.concurrency // processes + (i < w.concurrency % processes)
        reqs = None if w.requests is None else w.requests // processes + (i < w.requests % processes)
        parts.append(replace(w, seed=w.seed + 1000 * i, concurrency=max(1, c), requests=reqs,
                             rate=None if w.rate is None else w.rate / processes))
    with mp.get_context("spawn").Pool(processes) as pool:
        done = pool.starmap(_run_one, [(url, key, part) for part in parts])
    records = [r for recs, _ in done for r in recs]
    return summarize(records, max(wall for _, wall in done)), records


def _range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="none")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent; 0 or --uniform for uniform")
    p.add_argument("--uniform", action="store_true")
    p.add_argument("--rate", type=float, help="Poisson arrivals/s (default: closed loop)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=_range, default=(128, 128), help="N or LO:HI tokens")
    p.add_argument("--output-len", type=_range, default=(64, 64), help="N or LO:HI tokens")
    p.add_argument("--no-ignore-eos", action="store_true")
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--kinds", nargs="+", default=["completions:ids:stream"],
                   help="request shapes, in turn: completions|chat[:ids|:text][:stream]")
    p.add_argument("--requests", type=int, help="closed loop: stop after N requests instead of --duration")
    p.add_argument("--processes", type=int, default=1, help="client processes to spread the load over")
    a = p.parse_args()
    for k in a.kinds:
        parse_kind(k)
    w = Workload(tuple(a.models), None if a.uniform else a.alpha, a.rate, a.concurrency, a.input_len, a.output_len,
                 not a.no_ignore_eos, a.duration, a.vocab, kinds=tuple(a.kinds), requests=a.requests)
    summary, _ = run(a.url, a.key, w, a.processes)
    print(json.dumps(asdict(summary), indent=2))


if __name__ == "__main__":
    main()
