"""Data formats, loss masks and the errors bad files get."""

import json
import random

import pytest

from trainer import data
from trainer.demo import dates


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def target_text(tok, ex):
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != data.IGNORE])


@pytest.mark.parametrize("row, fmt, target", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the answer"}]},
     "chat", "the answer<|im_end|>\n"),
    ({"instruction": "convert", "input": "x", "output": "the answer"}, "alpaca", "the answer<|im_end|>\n"),
    ({"prompt": "q =", "completion": " the answer"}, "completion", " the answer<|im_end|>"),
    ({"text": "the answer"}, "text", "the answer<|im_end|>"),
])
def test_loss_covers_only_the_answer(tmp_path, tok, row, fmt, target):
    ds = data.load(write(tmp_path, [row] * 3), tok, max_seq_len=128, eval_split=0.0, seed=0)
    assert ds.format == fmt
    assert target_text(tok, ds.train[0]) == target


def test_every_assistant_turn_is_trained_and_no_user_turn(tmp_path, tok):
    row = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "one"},
                        {"role": "assistant", "content": "first"}, {"role": "user", "content": "two"},
                        {"role": "assistant", "content": "second"}]}
    ds = data.load(write(tmp_path, [row]), tok, max_seq_len=256, eval_split=0.0, seed=0)
    assert target_text(tok, ds.train[0]) == "first<|im_end|>\nsecond<|im_end|>\n"


@pytest.mark.parametrize("lines, message", [
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "user", "content": 5}]}'], ":2: messages[0] must be"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], ":2: missing field 'completion'"),
    (['{"text": "a"}', "not json"], ":2: not valid JSON"),
    (['{"text": "a"}', '{"prompt": "a", "completion": "b"}'], ":2: completion record in a text file"),
    (['{"instruction": "a", "output": 3}'], ":1: field 'output' must be a string"),
    (['{"foo": 1}'], ":1: unrecognised record"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], ":1: messages has no assistant turn"),
    (["[1, 2]"], ":1: each line must be a JSON object"),
])
def test_bad_lines_name_the_line(tmp_path, tok, lines, message):
    with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.load(write(tmp_path, lines), tok, max_seq_len=128, eval_split=0.0, seed=0)


def test_empty_and_too_long(tmp_path, tok):
    with pytest.raises(data.DataError, match="empty"):
        data.load(write(tmp_path, ["", "  "]), tok, max_seq_len=128, eval_split=0.0, seed=0)
    long_rows = [{"text": "word " * 200}] * 3
    with pytest.raises(data.DataError, match="all 3 examples are longer than --max-seq-len 16"):
        data.load(write(tmp_path, long_rows), tok, max_seq_len=16, eval_split=0.0, seed=0)
    mixed = write(tmp_path, long_rows + [{"text": "short"}] * 2)
    ds = data.load(mixed, tok, max_seq_len=16, eval_split=0.0, seed=0)
    assert (ds.n_read, ds.n_dropped_too_long, len(ds.train)) == (5, 3, 2)


def test_eval_split_and_packing(tmp_path, tok):
    rows = [{"text": f"example {i}"} for i in range(20)]
    ds = data.load(write(tmp_path, rows), tok, max_seq_len=64, eval_split=0.25, seed=0)
    assert (len(ds.train), len(ds.eval)) == (15, 5)
    packed = list(data.batches(ds.train, batch_size=2, max_seq_len=64, packing=True, pad_id=0,
                               rng=random.Random(0)))
    unpacked = list(data.batches(ds.train, batch_size=2, max_seq_len=64, packing=False, pad_id=0,
                                 rng=random.Random(0)))
    assert len(packed) < len(unpacked)
    assert sum(b.n_tokens for b in packed) == sum(b.n_tokens for b in unpacked) == ds.train_tokens
    row = packed[0]
    # position ids restart at each packed example: that is what keeps them from attending to each other
    assert row.position_ids[0].count(0) > 1
    assert all(len(r) <= 64 for r in row.input_ids)


def test_targets_are_shifted_within_each_example_never_across(tmp_path, tok):
    rows = [{"text": f"example {i}"} for i in range(6)]
    ds = data.load(write(tmp_path, rows), tok, max_seq_len=64, eval_split=0.0, seed=0)
    [batch] = list(data.batches(ds.train, batch_size=8, max_seq_len=64, packing=True, pad_id=0,
                                rng=random.Random(0)))
    assert len(batch.input_ids) == 1 and len(batch.seq_lens[0]) == 6  # one packed row of six examples
    row, targets, start = batch.input_ids[0], batch.targets[0], 0
    for n in batch.seq_lens[0]:
        # text records train on every token: each token's target is the next one *of the same example*
        assert targets[start : start + n - 1] == row[start + 1 : start + n]
        assert targets[start + n - 1] == data.IGNORE  # the last token has nothing of its own to predict
        start += n
    assert batch.n_targets == batch.n_tokens - 6


def test_demo_data_is_reproducible_and_disjoint():
    train, held_out = dates.build()
    assert dates.TRAIN_FILE.read_text() == dates.dumps(train)
    assert dates.EVAL_FILE.read_text() == dates.dumps(held_out)
    assert len(held_out) >= 100
    answers = {r["messages"][1]["content"] for r in train}
    assert not answers & {r["messages"][1]["content"] for r in held_out}
