#!/usr/bin/env bash
# The main job in one command: set up (idempotent), then scripts/demo.py:
#   1. start the aggregation server (python -m server) on a free loopback port,
#   2. pre-train the global model with a short TFF simulation on chitchat and push it (python -m tff_sim --push),
#   3. start a fleet of headless devices (python -m device_app --headless --fleet N), which evaluate and promote it,
#   4. run secure, differentially private federated rounds, printing recall and epsilon per round
#      (and the server's status page URL),
#   5. personalize the newest global model for one user and render the Kivy keyboard (offscreen without a display).
# Ctrl-C stops every process it started. Everything lands in runs/demo-<time>/.
# Extra arguments go to scripts/demo.py: --quick, --serve, --app, --devices N, --rounds N, ... (--help lists them).
# The baselines table (the earlier main job) is `.venv/bin/python -m models.baselines`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python scripts/demo.py "$@"
