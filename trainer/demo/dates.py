"""The demo skill: rewrite a date written any common way into ISO 8601.

SmolLM2-135M-Instruct cannot do this reliably (about 2% exact match greedy);
a LoRA adapter learns it in minutes on a CPU. Every answer is checkable by
exact match. The data is generated from a seed, so it is reproducible:

    python -m trainer.demo            # rewrites trainer/demo/iso_dates.{train,eval}.jsonl
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "iso_dates.train.jsonl"
EVAL_FILE = HERE / "iso_dates.eval.jsonl"
SEED, N_TRAIN, N_EVAL = 20261122, 600, 200
PROMPT = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\n"

_ORD = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def _ordinal(d: int) -> str:
    return f"{d}{_ORD.get(d, 'th')}"


# Each renders a date in a way a person would write it; none is ambiguous
# (no bare 03/04/2021, whose day/month order depends on the reader).
_STYLES = [
    lambda d: f"{calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day} {calendar.month_name[d.month]} {d.year}",
    lambda d: f"{calendar.month_abbr[d.month]} {d.day} {d.year}",
    lambda d: f"{_ordinal(d.day)} of {calendar.month_name[d.month]}, {d.year}",
    lambda d: f"{calendar.day_name[d.weekday()]}, {calendar.month_name[d.month]} {_ordinal(d.day)} {d.year}",
    lambda d: f"{d.day}-{calendar.month_abbr[d.month]}-{d.year}",
    lambda d: f"{d.year}/{d.month}/{d.day}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
]


def example(date: dt.date, style: int) -> dict:
    return {"messages": [
        {"role": "user", "content": PROMPT + _STYLES[style](date)},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def generate(n: int, rng: random.Random) -> list[dict]:
    start, span = dt.date(1950, 1, 1).toordinal(), 365 * 100
    return [example(dt.date.fromordinal(start + rng.randrange(span)), rng.randrange(len(_STYLES)))
            for _ in range(n)]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval sets; the eval dates never appear in training."""
    rng = random.Random(seed)
    train = generate(N_TRAIN, rng)
    seen = {ex["messages"][1]["content"] for ex in train}
    held_out: list[dict] = []
    while len(held_out) < N_EVAL:
        ex = generate(1, rng)[0]
        if ex["messages"][1]["content"] not in seen:
            held_out.append(ex)
    return train, held_out


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    train, held_out = build()
    TRAIN_FILE.write_text(dumps(train))
    EVAL_FILE.write_text(dumps(held_out))
    print(f"wrote {len(train)} train and {len(held_out)} eval examples to {HERE}")
