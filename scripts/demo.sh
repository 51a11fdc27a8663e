#!/usr/bin/env bash
# The main job: the end-to-end demo on the embedded default (local Ray, SQLite MLflow in ./).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/ctrl-ray demo --config configs/demo.yaml "$@"
