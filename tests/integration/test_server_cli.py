"""`python -m server` flags: clear errors before anything starts."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300, **kw)


def test_unknown_quantization_lists_what_vllm_offers(tiny_base, tmp_path):
    r = run("--base", str(tiny_base), "--data-dir", str(tmp_path), "--quantization", "nf5-magic")
    assert r.returncode == 2
    assert "--quantization 'nf5-magic'" in r.stderr and "it offers:" in r.stderr and "fp8" in r.stderr


def test_bad_flags_name_the_flag(tmp_path):
    r = run("--max-lora-rank", "12", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--max-lora-rank" in r.stderr and "320" in r.stderr
    r = run("--max-loras", "8", "--max-cpu-loras", "4", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--max-cpu-loras (4) must be >= --max-loras (8)" in r.stderr
    r = run("--base", str(tmp_path / "missing"), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--base" in r.stderr and "no such directory" in r.stderr


def test_env_and_config_file_equivalents(tmp_path):
    from server.config import Settings

    cfg = tmp_path / "server.toml"
    cfg.write_text("max_loras = 3\nport = 9001\n")
    import os

    env = {**os.environ, "LORAPLEX_CONFIG": str(cfg), "LORAPLEX_PORT": "9002"}
    code = ("from pydantic_settings import CliApp; from server.config import Settings; "
            "s = CliApp.run(Settings, cli_args=['--max-cpu-loras', '70']); print(s.max_loras, s.port, s.max_cpu_loras)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["3", "9002", "70"]  # file < environment < flags
    assert Settings().max_cpu_loras >= Settings().max_loras


def test_tenants_cli(tmp_path):
    key = run("tenants", "create", "acme", "--data-dir", str(tmp_path)).stdout.strip()
    assert key.startswith("lpx_")
    listing = run("tenants", "list", "--data-dir", str(tmp_path)).stdout
    assert "acme" in listing and key not in listing and key[:8] in listing
    dup = run("tenants", "create", "acme", "--data-dir", str(tmp_path))
    assert dup.returncode == 2 and "exists" in dup.stderr
    bad = run("tenants", "create", "Bad/Name", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "name" in bad.stderr
    assert run("tenants", "revoke", "acme", "--data-dir", str(tmp_path)).returncode == 0
    assert "revoked" in run("tenants", "list", "--data-dir", str(tmp_path)).stdout
    assert run("tenants", "revoke", "nobody", "--data-dir", str(tmp_path)).returncode == 2
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").rglob("*.safetensors"))


def test_help_describes_every_flag_and_lists_vllms_engine_arguments():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    from server.config import Settings

    ours = r.stdout.split("Any other flag is one of vLLM's engine arguments")[0]
    for name, field in Settings.model_fields.items():
        if name == "engine_args":  # filled from vLLM's flags, not a flag itself
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in ours, flag
        assert field.description, f"{flag} has no description"
        assert field.description.split()[0] in ours, f"{flag}'s description is not in --help"
    assert "--max-num-seqs" in ours and "--block-size" in r.stdout.split("engine arguments")[1]


def test_unknown_flags_are_refused_by_name(tmp_path):
    r = run("--no-such-flag", "3", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--no-such-flag" in r.stderr
    r = run("--enable-lora", "--data-dir", str(tmp_path))  # vLLM's, but loraplex's to set
    assert r.returncode == 2 and "--enable-lora is set by loraplex" in r.stderr
    r = run("--enable-auto-tool-choice", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--tool-call-parser" in r.stderr
