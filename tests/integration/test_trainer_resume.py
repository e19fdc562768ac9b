"""Ctrl-C saves a checkpoint; --resume continues from that step to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from trainer.fit import FitArgs, run


def test_ctrl_c_then_resume(tiny_base, tiny_data, tmp_path):
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "trainer", "fit", "--base", str(tiny_base), "--data", str(tiny_data),
            "--r", "8", "--epochs", "40", "--lr", "1e-3", "--out", str(out), "--name", "t"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = out / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output and "--resume" in output
    state = out / "t" / "checkpoint" / "state.pt"
    assert state.is_file()
    steps_before = len([r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r])
    assert 5 <= steps_before < 280

    result = run(FitArgs(base=str(tiny_base), data=tiny_data, r=8, epochs=40, lr=1e-3, out=out, name="t",
                         resume=True), progress=False)
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, result.manifest["metrics"]["steps"] + 1)), "resume continues, no step repeated"
    assert not (out / "t" / "checkpoint").exists()
    assert (out / "t" / "adapter_model.safetensors").is_file()


def test_resume_never_runs_code_from_a_checkpoint(tiny_base, tiny_data, tmp_path):
    """A state.pt that runs code when unpickled (a checkpoint someone else wrote) is refused, and
    its code never runs."""
    import pickle

    import pytest

    from trainer.fit import FitError

    out, marker = tmp_path / "runs", tmp_path / "pwned"
    ckpt = out / "t" / "checkpoint"
    ckpt.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": Payload()}))
    with pytest.raises(FitError, match="more than tensors"):
        run(FitArgs(base=str(tiny_base), data=tiny_data, r=8, out=out, name="t", resume=True), progress=False)
    assert not marker.exists()
