#!/usr/bin/env bash
# The project's test command: create/check the environment, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
# Modules run on two workers (pytest-xdist), each module whole on one worker (its engines start once), the
# long ones first (tests/conftest.py orders them): 1.6x faster than serial on a 2-core machine (CI's size)
# (bench/results/2026-12-08-cpu-suite-parallel.txt). LAYERCAST_TEST_WORKERS=0 runs serially.
exec .venv/bin/python -m pytest -q -ra --durations=40 -n "${LAYERCAST_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
