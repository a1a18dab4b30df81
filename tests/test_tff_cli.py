"""End to end: `python -m tff_sim` interrupted with Ctrl-C, its worker reaped, then resumed; the example."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def _rounds_done(out: Path) -> int:
    try:
        rows = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return 0
    return max((r["round"] for r in rows), default=0)


@pytest.mark.slow
def test_ctrl_c_checkpoints_reaps_the_worker_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tff_sim", "--preset", "tiny", "--max-train-clients", "8", "--clients-per-round", "4",
           "--rounds", "8", "--max-examples-per-client", "32", "--eval-every", "4", "--eval-clients", "3",
           "--final-eval-max-sentences", "300", "--checkpoint-every", "1", "--output", str(out), "--baselines", "",
           "--no-progress", "--no-tensorboard"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, workers = psutil.Process(proc.pid), set()
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and _rounds_done(out) < 2:
            try:
                workers |= {c for c in parent.children(recursive=True) if "worker_binary" in c.name()}
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert workers, "TFF started no worker_binary"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "rerun the same command to resume" in output
    psutil.wait_procs(list(workers), timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    from tff_sim import checkpoint

    stopped_at = checkpoint.read_header(out)["round"]
    assert 2 <= stopped_at < 8
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"resuming from the checkpoint of round {stopped_at}" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == stopped_at and summary["rounds_done"] == 8
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == list(range(0, 9))
    assert (out / "model" / "weights.fkw").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_three_users_example_matches_tff(tmp_path):
    done = subprocess.run([sys.executable, "examples/three_users.py", "--rounds", "2", "--max-examples", "64"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("(bob, alice, sue)" in line for line in lines) == 2
    assert sum("(TFF: bob, alice, sue)" in line for line in lines) == 2
    diff = float(lines[-1].rsplit(":", 1)[1])
    assert diff < 1e-4


@pytest.mark.slow
def test_a_folder_of_text_files_trains_one_client_per_file(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("ann", "ben", "cat"):
        (folder / f"{name}.txt").write_text(" ".join(f"{name} wrote message number {i} today." for i in range(60)))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tff_sim", "--dataset", str(folder), "--preset", "tiny", "--rounds", "3",
                           "--clients-per-round", "2", "--output", str(out), "--baselines", "", "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train_clients"] == 3 and summary["data"]["heldout_clients"] == 0
    assert set(summary["final"]) == {"test"} and summary["final"]["test"]["top1_recall"] > 0.1
