"""The main job, end to end on the embedded default (run by scripts/demo.sh):

1. train the ISO-date adapter on smollm2-135m (once; reused if runs/iso-dates exists),
2. start `python -m server` on smollm2-135m with an SQLite registry in runs/demo-data,
3. create a `demo` tenant and push the adapter into it,
4. ask base and adapter the same held-out questions through the official openai client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
ADAPTER = RUNS / "iso-dates"
DATA = RUNS / "demo-data"
PORT = int(os.environ.get("LORAPLEX_DEMO_PORT", "8000"))
PY = sys.executable


def sh(*args: str) -> str:
    return subprocess.run([PY, *args], check=True, capture_output=True, text=True, cwd=ROOT).stdout


def demo_key() -> str:
    key_file = DATA / "demo.key"
    if not key_file.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        key = sh("-m", "server", "tenants", "create", "demo", "--data-dir", str(DATA)).strip().splitlines()[-1]
        key_file.write_text(key)
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def main() -> None:
    if not (ADAPTER / "loraplex.json").exists():
        subprocess.run([PY, "-m", "trainer", "fit", "--r", "16", "--name", "iso-dates", "--overwrite"], check=True,
                       cwd=ROOT)
    key = demo_key()
    log = (RUNS / "demo-server.log").open("wb")
    server = subprocess.Popen([PY, "-m", "server", "--data-dir", str(DATA), "--port", str(PORT)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{PORT}"
        print(f"starting the server on smollm2-135m at {url} (log: {log.name}) ...", flush=True)
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited; see {log.name}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit(f"the server did not become ready; see {log.name}")
            time.sleep(1)
        print(sh("-m", "trainer", "push", str(ADAPTER), "--url", url, "--key", key, "--replace").strip())

        client = OpenAI(base_url=f"{url}/v1", api_key=key)
        print("models:", ", ".join(m.id for m in client.models.list().data))
        rows = [json.loads(line) for line in (ROOT / "trainer/demo/iso_dates.eval.jsonl").read_text().splitlines()]
        for row in rows[:4]:
            question, expected = row["messages"][0]["content"], row["messages"][1]["content"]
            print(f"\nuser: {question.splitlines()[-1]!r}   (expected {expected})")
            for model in ("smollm2-135m", "smollm2-135m:iso-dates"):
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=24, temperature=0)
                print(f"  {model:24} -> {r.choices[0].message.content!r}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
