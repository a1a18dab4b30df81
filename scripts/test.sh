#!/usr/bin/env bash
# Set up (idempotent) and run the tests. Default: everything but the slow end-to-end
# tests; `--all` adds them (CI runs --all); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
marker=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then marker=(); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest "${marker[@]}" "${args[@]}"
