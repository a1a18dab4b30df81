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


def _command(out: Path, rounds: int = 8) -> list[str]:
    return [sys.executable, "-m", "tff_sim", "--preset", "tiny", "--max-train-clients", "8", "--clients-per-round", "4",
            "--rounds", str(rounds), "--max-examples-per-client", "32", "--eval-every", "4", "--eval-clients", "3",
            "--final-eval-max-sentences", "300", "--checkpoint-every", "1", "--output", str(out), "--baselines", "",
            "--no-progress", "--no-tensorboard"]


def _workers(parent: psutil.Process) -> set[psutil.Process]:
    try:
        return {c for c in parent.children(recursive=True) if "worker_binary" in c.name()}
    except psutil.NoSuchProcess:
        return set()


def _interrupt_at(cmd: list[str], marker: str, sig: int) -> tuple[int, str, set[psutil.Process], float]:
    """Run cmd, send `sig` the moment a line containing `marker` appears; (exit code, output, TFF workers
    seen, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, lines, workers = psutil.Process(proc.pid), [], set()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                workers |= _workers(parent)
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"{marker!r} never appeared:\n" + "".join(lines)[-3000:])
        sent = time.monotonic()
        workers |= _workers(parent)
        rest, _ = proc.communicate(timeout=120)
        return proc.returncode, "".join(lines) + rest, workers, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def _assert_stopped_cleanly(code: int, output: str, workers: set[psutil.Process], sig: int) -> None:
    assert code == 128 + sig, output[-3000:]
    assert "rerun the same command to resume" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    psutil.wait_procs(list(workers), timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], "a worker_binary outlived the run"


# Each phase of a run, entered as its log line appears; the signal lands inside it (each lasts seconds).
PHASES = [
    ("phase: loading TensorFlow and TFF", signal.SIGINT),
    ("phase: building the federated process", signal.SIGTERM),
    ("phase: starting TFF's worker", signal.SIGINT),
]


@pytest.mark.slow
@pytest.mark.parametrize("marker,sig", PHASES, ids=["import", "tracing", "worker-start"])
def test_a_signal_before_the_first_round_stops_the_run(tmp_path, marker, sig):
    code, output, workers, seconds = _interrupt_at(_command(tmp_path / "run"), marker, sig)
    _assert_stopped_cleanly(code, output, workers, sig)
    assert seconds < 60, f"took {seconds:.0f} s to stop"
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_reaps_the_worker_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = _command(out)
    code, output, workers, seconds = _interrupt_at(cmd, "round 2/8 done", signal.SIGINT)
    assert workers, "TFF started no worker_binary"
    _assert_stopped_cleanly(code, output, workers, signal.SIGINT)
    assert seconds < 60, f"took {seconds:.0f} s to stop"

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
def test_sigterm_in_the_final_evaluation_keeps_the_last_round_and_the_rerun_only_reports(tmp_path):
    out = tmp_path / "run"
    cmd = _command(out, rounds=3)
    code, output, workers, _ = _interrupt_at(cmd, "phase: final evaluation", signal.SIGTERM)
    _assert_stopped_cleanly(code, output, workers, signal.SIGTERM)
    assert not (out / "summary.json").exists()

    from tff_sim import checkpoint

    assert checkpoint.read_header(out)["round"] == 3
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resuming from the checkpoint of round 3" in done.stderr and "round 1/3 done" not in done.stderr
    assert json.loads((out / "summary.json").read_text())["rounds_done"] == 3


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
