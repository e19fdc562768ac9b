"""S-LoRA-style load generator over the OpenAI API (the official async `openai` client).

Requests pick a model from a list (a base and/or adapters) by power-law
popularity (p_i ~ 1/(i+1)^alpha, S-LoRA's workload) or uniformly, arrive as a
Poisson process at rate R or from C closed-loop clients, and stream their
completions so time to first token is measured where a user would see it.
Prompts are token ids (the completions API takes them), so input length is
exact and identical across the systems compared.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/v1 --key KEY \
        --models base base:a0 base:a1 --alpha 1 --concurrency 8 --duration 60
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


class Generator:
    def __init__(self, url: str, key: str, w: Workload):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        self.w = w
        self.rng = random.Random(w.seed)
        self.np_rng = np.random.default_rng(w.seed)
        self.p = w.weights()

    def _request(self) -> tuple[str, list[int], int]:
        model = self.w.models[int(self.np_rng.choice(len(self.w.models), p=self.p))]
        n_in = self.rng.randint(*self.w.input_len)
        prompt = [self.rng.randrange(100, self.w.vocab - 100) for _ in range(n_in)]
        return model, prompt, self.rng.randint(*self.w.output_len)

    async def one(self, model: str, prompt: list[int], n_out: int) -> Record:
        rec = Record(model, time.perf_counter())
        try:
            stream = await self.client.completions.create(
                model=model, prompt=prompt, max_tokens=n_out, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": self.w.ignore_eos})
            async for chunk in stream:
                if rec.ttft is None and chunk.choices and chunk.choices[0].text:
                    rec.ttft = time.perf_counter() - rec.start
                if chunk.usage is not None:
                    rec.output_tokens = chunk.usage.completion_tokens
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
                while time.perf_counter() < deadline:
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


def run(url: str, key: str, w: Workload) -> tuple[Summary, list[Record]]:
    records, wall = asyncio.run(Generator(url, key, w).run())
    return summarize(records, wall), records


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
    a = p.parse_args()
    w = Workload(tuple(a.models), None if a.uniform else a.alpha, a.rate, a.concurrency, a.input_len, a.output_len,
                 not a.no_ignore_eos, a.duration, a.vocab)
    summary, _ = run(a.url, a.key, w)
    print(json.dumps(asdict(summary), indent=2))


if __name__ == "__main__":
    main()
