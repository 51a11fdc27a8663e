#!/usr/bin/env bash
# The test suite (real Ray runtime, real SQLite MLflow store in a tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
