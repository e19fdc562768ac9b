"""Training data: four JSONL formats in, token ids with a loss mask out.

Accepted line shapes (one format per file, detected from the first line):

- chat:       {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
- alpaca:     {"instruction": "...", "input": "...", "output": "..."}   (input optional)
- completion: {"prompt": "...", "completion": "..."}
- text:       {"text": "..."}

Chat and alpaca go through the *base tokenizer's* chat template, so the adapter
learns the exact format the server's /v1/chat/completions will render. The loss
covers only assistant turns (chat, alpaca) or the completion, never the prompt;
plain text is trained on every token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100  # label value the loss skips (PyTorch's cross_entropy default)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset problem, with the file and line it was found at."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    format: str
    n_read: int
    n_dropped_too_long: int = 0
    eval_rows: list[dict] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)


def _fail(path: Path, lineno: int, msg: str) -> DataError:
    return DataError(f"{path}:{lineno}: {msg}")


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    return "unknown"


def _str_field(row: dict, key: str, path: Path, lineno: int, *, optional: bool = False) -> str:
    if key not in row:
        if optional:
            return ""
        raise _fail(path, lineno, f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise _fail(path, lineno, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(row: dict, fmt: str, path: Path, lineno: int) -> list[dict]:
    """Validate a chat or alpaca row and return it as chat messages."""
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction", path, lineno)
        extra = _str_field(row, "input", path, lineno, optional=True)
        output = _str_field(row, "output", path, lineno)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(path, lineno, "field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _fail(path, lineno, f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(path, lineno, "messages has no assistant turn to learn from")
    return messages


def read_rows(path: Path) -> tuple[str, list[tuple[int, dict]]]:
    """Parse and shape-check a JSONL file; every line must share one format."""
    if not path.is_file():
        raise DataError(f"--data {str(path)!r}: no such file")
    rows: list[tuple[int, dict]] = []
    fmt = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(path, lineno, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise _fail(path, lineno, "each line must be a JSON object")
            this = detect_format(row)
            if this == "unknown":
                raise _fail(path, lineno, "unrecognised record: expected 'messages', 'instruction'/'output', "
                                          "'prompt'/'completion' or 'text'")
            if fmt is None:
                fmt = this
            elif this != fmt:
                raise _fail(path, lineno, f"{this} record in a {fmt} file (one format per file)")
            if fmt in ("chat", "alpaca"):
                to_messages(row, fmt, path, lineno)
            elif fmt == "completion":
                _str_field(row, "prompt", path, lineno)
                _str_field(row, "completion", path, lineno)
            else:
                _str_field(row, "text", path, lineno)
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"--data {str(path)!r}: the dataset is empty")
    return fmt, rows


class Encoder:
    """Turns validated rows into :class:`Example` with the base tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _chat_ids(self, messages: list[dict], *, generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self._ids(text)

    def encode(self, row: dict, fmt: str, path: Path, lineno: int) -> Example:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if fmt == "text":
            ids = self._ids(row["text"]) + eos
            return Example(ids, list(ids))
        if fmt == "completion":
            prompt, completion = self._ids(row["prompt"]), self._ids(row["completion"]) + eos
            return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
        if not self.tok.chat_template:
            raise DataError(f"{path}:{lineno}: {fmt} data needs a chat template, and the base tokenizer has none "
                            "(use 'prompt'/'completion' or 'text' records)")
        messages = to_messages(row, fmt, path, lineno)
        ids = self._chat_ids(messages, generation_prompt=False)
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # The assistant turn is what the template adds between "prompt up to
            # here" and "conversation through this turn".
            start = len(self._chat_ids(messages[:i], generation_prompt=True))
            end = len(self._chat_ids(messages[: i + 1], generation_prompt=False))
            if ids[:end][:start] != self._chat_ids(messages[:i], generation_prompt=True):
                raise DataError(f"{path}:{lineno}: the chat template does not render turns as a prefix; "
                                "cannot tell the assistant tokens apart")
            labels[start:end] = ids[start:end]
        return Example(ids, labels)


def load(path: Path, tokenizer, *, max_seq_len: int, eval_split: float, seed: int) -> Dataset:
    """Read, validate, tokenise, drop over-long examples and split train/eval."""
    if not 0.0 <= eval_split < 1.0:
        raise DataError(f"--eval-split must be in [0, 1); got {eval_split}")
    fmt, rows = read_rows(path)
    enc = Encoder(tokenizer)
    examples: list[tuple[dict, Example]] = []
    dropped = 0
    for lineno, row in rows:
        ex = enc.encode(row, fmt, path, lineno)
        if len(ex.input_ids) > max_seq_len:
            dropped += 1  # truncating could cut the very answer being taught; drop instead
        elif ex.n_target:
            examples.append((row, ex))
    if not examples:
        raise DataError(f"--data {str(path)!r}: all {len(rows)} examples are longer than --max-seq-len "
                        f"{max_seq_len} tokens (or have nothing to learn); nothing left to train on")
    random.Random(seed).shuffle(examples)
    n_eval = int(round(len(examples) * eval_split))
    if eval_split > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= len(examples):
        raise DataError(f"--eval-split {eval_split} leaves no training examples out of {len(examples)}")
    return Dataset(
        train=[e for _, e in examples[n_eval:]],
        eval=[e for _, e in examples[:n_eval]],
        eval_rows=[r for r, _ in examples[:n_eval]],
        format=fmt,
        n_read=len(rows),
        n_dropped_too_long=dropped,
    )


@dataclass
class Batch:
    """Rows of token ids, right-padded to the widest row.

    ``labels`` follow Hugging Face's convention (aligned with ``input_ids``; the
    model shifts them). ``targets`` are already shifted, *per example*: token t's
    target is the label of token t+1 of the same example, and the last token of
    each example has none, so a packed row never asks one example to predict the
    next one's first token. ``seq_lens`` lists each row's examples in order: the
    document boundaries varlen attention needs.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    targets: list[list[int]]
    seq_lens: list[list[int]]
    n_tokens: int
    """Real tokens (no padding)."""
    n_targets: int
    """Tokens the loss is taken on: what the step's mean is taken over."""


def _targets(ex: Example) -> list[int]:
    return ex.labels[1:] + [IGNORE]


def pack(examples: list[Example], max_seq_len: int) -> list[list[Example]]:
    """Lay examples end to end, in order, into rows of at most ``max_seq_len`` tokens."""
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        if current and used + len(ex.input_ids) > max_seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        rows.append(current)
    return rows


def batches(examples: list[Example], *, batch_size: int, max_seq_len: int, packing: bool,
            pad_id: int, rng: random.Random) -> Iterator[Batch]:
    """One epoch of batches, shuffled.

    Without packing each row is one example, right-padded. With packing,
    examples are laid end to end into rows of up to ``max_seq_len`` tokens and
    ``position_ids`` restart at every example, so packed examples never attend
    to each other: on CUDA the trainer runs varlen attention over ``seq_lens``
    (no padding at all); elsewhere transformers turns the restarting
    ``position_ids`` into a block-diagonal causal mask.
    """
    order = list(examples)
    rng.shuffle(order)
    rows = pack(order, max_seq_len) if packing else [[ex] for ex in order]
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, labels, pos, targets = [], [], [], []
        for row in chunk:
            ids.append([t for ex in row for t in ex.input_ids])
            labels.append([t for ex in row for t in ex.labels])
            pos.append([p for ex in row for p in range(len(ex.input_ids))])
            targets.append([t for ex in row for t in _targets(ex)])
        width = max(map(len, ids))
        n_tokens = sum(map(len, ids))
        n_targets = sum(1 for row in targets for t in row if t != IGNORE)
        for a, b, c, d in zip(ids, labels, pos, targets):
            pad = width - len(a)
            a += [pad_id] * pad
            b += [IGNORE] * pad
            c += list(range(len(c), len(c) + pad))
            d += [IGNORE] * pad
        yield Batch(ids, labels, pos, targets, [[len(ex.input_ids) for ex in row] for row in chunk],
                    n_tokens, n_targets)
