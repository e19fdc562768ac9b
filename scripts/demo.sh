#!/usr/bin/env bash
# The main job on the embedded default, on a CPU: install, train the ISO-date
# adapter on the bundled SmolLM2-135M, and compare base vs adapter on held-out data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
$PY -m trainer plan --r 16
$PY -m trainer fit --r 16 --name iso-dates --overwrite
$PY -m trainer eval runs/iso-dates --limit 200
