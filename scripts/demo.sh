#!/usr/bin/env bash
# The main job in one command: set up (idempotent), then scripts/demo.py:
#   1. start the aggregation server (python -m server) on a free loopback port from the shipped model
#      models/pretrained/small (trained centrally on the donors' text only; served at once as version 1),
#      DP-FTRL (--dp-mode ftrl), release gating and secure aggregation on,
#   2. say where the starting model came from and how it compares with the KN 5-gram on the donors' text,
#   3. start a fleet of headless devices replaying the federated users (python -m device_app --headless --fleet N),
#   4. run secure DP-FTRL rounds, each version evaluated by the fleet before it is served, printing recall,
#      epsilon and the release decision per version (and the server's status page URL),
#   5. personalize the served global model for one user and render the Kivy keyboard (offscreen without a display).
#   (--tff-pretrain: the earlier start instead of 1-2: TFF pre-training from random weights, pushed and promoted.)
# Ctrl-C stops every process it started. Everything lands in runs/demo-<time>/.
# Extra arguments go to scripts/demo.py: --quick, --serve, --app, --devices N, --rounds N, ... (--help lists them).
# The baselines table (the earlier main job) is `.venv/bin/python -m models.baselines`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python scripts/demo.py "$@"
