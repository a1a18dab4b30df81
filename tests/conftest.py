"""Test session setup: quiet TensorFlow, headless Kivy, and no orphaned TFF workers."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_NO_CONSOLELOG", "1")
os.environ.setdefault("KIVY_HOME", tempfile.mkdtemp(prefix="kivy-home-"))


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    from tff_sim.reaper import reap_worker_binaries

    reap_worker_binaries()
