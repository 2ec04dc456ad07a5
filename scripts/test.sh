#!/usr/bin/env bash
# The project's test command: create/check the environment, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra --durations=40 "$@"
