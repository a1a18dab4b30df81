#!/usr/bin/env bash
# Set up (idempotent) and run the main job. Today: build the federated chitchat data,
# train the n-gram and server-trained baselines, print and save their table.
# Extra arguments go to `python -m models.baselines` (e.g. --full).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m models.baselines "$@"
