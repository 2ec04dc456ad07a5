#!/usr/bin/env bash
# The main job: create/check the environment, then run a demo sync on the built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/layercast demo "$@"
