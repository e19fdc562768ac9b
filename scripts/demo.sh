#!/usr/bin/env bash
# The main job on the embedded default, on a CPU: install, train the ISO-date
# adapter on the bundled SmolLM2-135M (once), serve base + adapter with
# `python -m server`, and show both answers through the openai client.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python scripts/demo.py
