"""`python -m trainer push` into the real server, then served through the openai client."""

from __future__ import annotations

from typer.testing import CliRunner

from trainer.__main__ import app


def test_push_then_serve_then_replace(cluster):
    adapter = cluster.adapters["a2"]
    args = ["push", str(adapter), "--url", cluster.url, "--key", cluster.keys["alice"], "--name", "pushed"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "pushed pushed v1" in r.output and "model='tiny:pushed'" in r.output
    out = cluster.client("alice").completions.create(model="tiny:pushed", prompt="hello", max_tokens=3,
                                                      extra_body={"ignore_eos": True})
    assert out.model == "tiny:pushed" and out.usage.completion_tokens == 3

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "409" in again.output and "--replace" in again.output
    replaced = CliRunner().invoke(app, [*args, "--replace"])
    assert replaced.exit_code == 0 and "v2" in replaced.output


def test_push_errors_name_the_problem(cluster, tmp_path):
    r = CliRunner().invoke(app, ["push", str(tmp_path), "--url", cluster.url, "--key", cluster.keys["alice"]])
    assert r.exit_code == 2 and "adapter_config.json" in r.output
    r = CliRunner().invoke(app, ["push", str(cluster.adapters["a1"]), "--url", cluster.url, "--key", "lpx_nope"])
    assert r.exit_code == 2 and "401" in r.output and "invalid API key" in r.output
    r = CliRunner().invoke(app, ["push", str(cluster.adapters["a1"]), "--url", "http://127.0.0.1:9", "--key", "x"])
    assert r.exit_code == 2 and "--url" in r.output
