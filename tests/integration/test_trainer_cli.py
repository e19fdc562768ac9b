"""Bad input to `python -m trainer fit`: a clear error naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from trainer.__main__ import app


@pytest.fixture
def fit(tiny_base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "runs"

    def invoke(*args: str, data=None):
        argv = ["fit", "--base", str(tiny_base), "--out", str(out), "--name", "a", "--epochs", "1", *args]
        if data is not None:
            argv += ["--data", str(data)]
        return runner.invoke(app, argv)

    invoke.out = out
    return invoke


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def assert_refused(result, out, *needles):
    assert result.exit_code == 2, result.output
    for n in needles:
        assert n in result.output, result.output
    assert not (out / "a").exists(), "a refused run must leave no output directory"


def test_bad_line_names_the_line(fit, tmp_path):
    data = jsonl(tmp_path, [GOOD, GOOD, {"messages": [{"role": "user"}]}])
    assert_refused(fit(data=data), fit.out, "d.jsonl:3:", "messages[0]")


def test_wrong_type_names_the_field(fit, tmp_path):
    data = jsonl(tmp_path, [{"prompt": "a", "completion": 7}])
    assert_refused(fit(data=data), fit.out, ":1:", "'completion' must be a string")


def test_empty_dataset(fit, tmp_path):
    assert_refused(fit(data=jsonl(tmp_path, [])), fit.out, "empty")


def test_all_examples_too_long_reports_the_count(fit, tmp_path):
    data = jsonl(tmp_path, [{"text": "january " * 100}] * 4)
    assert_refused(fit("--max-seq-len", "16", data=data), fit.out, "all 4 examples are longer than --max-seq-len 16")


def test_rank_vllm_refuses(fit, tmp_path):
    assert_refused(fit("--r", "12", data=jsonl(tmp_path, [GOOD])), fit.out,
                   "--r", "1, 8, 16, 32, 64, 128, 256, 320, 512", "got 12")


def test_target_vllm_cannot_serve(fit, tmp_path):
    assert_refused(fit("--targets", "q_proj,lm_head", data=jsonl(tmp_path, [GOOD])), fit.out, "--targets", "lm_head")


def test_missing_base(tmp_path):
    r = CliRunner().invoke(app, ["fit", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "--base" in r.output and "no such directory" in r.output
    assert not (tmp_path / "runs").exists()


def test_4bit_without_bitsandbytes(fit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a host where it is not installed
    assert_refused(fit("--4bit", data=jsonl(tmp_path, [GOOD])), fit.out, "--4bit", "bitsandbytes")


def test_unwritable_out(tiny_base, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory should be: unwritable even for root
    r = CliRunner().invoke(app, ["fit", "--base", str(tiny_base), "--out", str(blocker / "runs")])
    assert r.exit_code == 2 and "--out" in r.output and "cannot write" in r.output


def test_existing_output_is_not_clobbered(fit, tmp_path):
    (fit.out / "a").mkdir(parents=True)
    (fit.out / "a" / "keep.txt").write_text("mine")
    r = fit(data=jsonl(tmp_path, [GOOD]))
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (fit.out / "a" / "keep.txt").read_text() == "mine"


def test_plan_prints_three_modes(tiny_base):
    r = CliRunner().invoke(app, ["plan", "--base", str(tiny_base), "--r", "8", "--batch-size", "2",
                                 "--max-seq-len", "16"])
    assert r.exit_code == 0, r.output
    assert all(w in r.output for w in ("full", "lora", "qlora", "weights", "optimizer", "activations"))
