"""Fleet mode: simulated devices replaying users' messages against a real server subprocess."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_app.fleet import FleetConfig, run_fleet
from device_app.fleet_progress import RoundSeen, format_round_progress
from device_app.testing import SAMPLE_MESSAGES, vocab_for
from models.config import preset
from models.data.types import ClientData, FederatedDataset
from tests.server_fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _dataset(n: int) -> FederatedDataset:
    clients = {}
    for i in range(n):
        msgs = [f"{m} {i}" for m in SAMPLE_MESSAGES[i % 3 :]] * 3
        clients[f"user{i}"] = ClientData(f"user{i}", train=msgs[:-3], test=msgs[-3:])
    return FederatedDataset("tiny-test", clients, train_ids=sorted(clients), heldout_ids=[])


def _server(root: Path, vocab_messages, *args: str) -> ServerProcess:
    vocab = vocab_for(vocab_messages, size=preset("tiny").vocab_size - 4)
    vocab.save(root / "vocab.json")
    return ServerProcess(root / "srv", ["--init-preset", "tiny", "--vocab-file", str(root / "vocab.json"),
                                        "--retry-min-s", "1", *args], root / "srv.log").start()


def test_fleet_runs_rounds_with_dropouts(tmp_path: Path) -> None:
    srv = _server(tmp_path, SAMPLE_MESSAGES, "--round-goal", "3", "--min-count", "2", "--deadline-s", "20",
                  "--dp-mode", "distributed", "--clip-norm", "0.5", "--noise-multiplier", "0.5", "--allow-noisy-dp")
    try:
        config = FleetConfig(server_url=srv.url, n_devices=6, rounds=2, duration_s=150, p_eligible=0.8, p_dropout=0.25,
                             initial_messages=5, step_s=0.1, max_wait_s=0.5, workers=3, seed=1)
        report = run_fleet(config, dataset=_dataset(6))
        summary = report.summary()
        assert not summary["errors"], summary["errors"]
        assert summary["rounds_advanced"] >= 2, summary
        assert summary["uploads"] >= 4 and summary["mean_devices_per_round"] >= 1
        assert summary["outcomes"].get("uploaded", 0) == summary["uploads"]
        assert summary["outcomes"].get("ineligible", 0) > 0  # random eligibility
        assert summary["messages_typed"] > 6 * 5
        with srv.admin() as admin:
            rounds = admin.get("/v1/admin/rounds").json()
        rounds = rounds["rounds"] if isinstance(rounds, dict) else rounds
        closed = [r for r in rounds if r["kind"] == "train" and r["state"] == "closed"]
        assert len(closed) >= 2 and all(r["accepted"] >= 2 for r in closed)
    finally:
        srv.stop()


def test_a_waiting_fleet_says_where_the_round_stands(tmp_path: Path) -> None:
    """No silent waits: 3 devices cannot fill a round whose goal is 10, and while the fleet waits it
    prints the round, its state and how many updates are submitted of how many needed, every 0.5 s."""
    srv = _server(tmp_path, SAMPLE_MESSAGES, "--round-goal", "10", "--min-count", "10", "--deadline-s", "300")
    try:
        config = FleetConfig(server_url=srv.url, n_devices=3, duration_s=4.0, p_eligible=1.0, p_dropout=0.0,
                             initial_messages=5, step_s=0.1, max_wait_s=0.5, workers=3, seed=2, progress_s=0.5)
        events: list[tuple[float, str]] = []
        report = run_fleet(config, dataset=_dataset(3), on_event=lambda m: events.append((time.monotonic(), m)))
        assert not report.summary()["errors"]
        progress = [(t, m) for t, m in events if m.startswith(("round ", "waiting for a round"))]
        waiting = [m for _, m in progress if re.match(r"round \d+ \(train\): open, [0-3] of 10 updates submitted "
                                                      r"\(\d+ admitted, \d devices working on it\); global v\d+$", m)]
        assert len(waiting) >= 2 and any(" 3 of 10 " in m for m in waiting), events
        gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:])]
        # every 0.5 s: no bursts, no long silences (a median: one poll of a busy server may take a while)
        assert 0.3 < statistics.median(gaps) < 1.5 and min(gaps) > 0.1 and max(gaps) < 3.0, (gaps, events)
    finally:
        srv.stop()


@pytest.mark.slow
def test_fleet_cli_with_chitchat_users(tmp_path: Path) -> None:
    """python -m device_app --headless --fleet N --dataset chitchat --server URL (real chitchat users)."""
    from models.data import load_dataset

    ds = load_dataset("chitchat")
    srv = _server(tmp_path, ds.all_train_sentences()[:20_000], "--round-goal", "3", "--min-count", "3")
    try:
        out = tmp_path / "fleet.json"
        cmd = [sys.executable, "-m", "device_app", "--headless", "--fleet", "5", "--dataset", "chitchat", "--server",
               srv.url, "--rounds", "1", "--duration", "240", "--p-eligible", "0.9", "--p-dropout", "0.1", "--step",
               "0.2", "--max-wait", "1", "--json-out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(out.read_text())
        assert summary["rounds_advanced"] >= 1 and summary["uploads"] >= 3 and not summary["errors"]
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("marker,sig", [("setting up", signal.SIGTERM), ("global model version", signal.SIGINT)],
                         ids=["setup", "rounds"])
def test_fleet_cli_stops_promptly_on_a_signal(tmp_path: Path, marker: str, sig: int) -> None:
    """Ctrl-C or SIGTERM while the devices are set up, or in the middle of a long run once rounds complete:
    the devices stop after their current step (training stops at its next batch), the report is still
    written (interrupted: true), and the exit code is 128 + the signal."""
    from models.data import load_dataset

    srv = _server(tmp_path, load_dataset("chitchat").all_train_sentences()[:20_000], "--round-goal", "3",
                  "--min-count", "3")
    try:
        out = tmp_path / "fleet.json"
        cmd = [sys.executable, "-m", "device_app", "--headless", "--fleet", "4", "--dataset", "chitchat", "--server",
               srv.url, "--duration", "600", "--step", "0.2", "--max-wait", "1", "--json-out", str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if marker in line:
                    break
            assert proc.poll() is None, "".join(lines)[-3000:]
            t0 = time.monotonic()
            proc.send_signal(sig)
            rest, _ = proc.communicate(timeout=120)
            assert time.monotonic() - t0 < 45, "the fleet kept running after the signal"
            assert proc.returncode == 128 + sig, (("".join(lines) + rest)[-3000:])
            assert "Traceback" not in rest, rest[-3000:]
            summary = json.loads(out.read_text())
            assert summary["interrupted"] is True and summary["seconds"] < 300
            if marker == "global model version":
                assert summary["uploads"] >= 3 and summary["rounds_advanced"] >= 1
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        srv.stop()


def test_fleet_against_a_secagg_server_uses_a_thread_per_device(tmp_path: Path) -> None:
    """With SecAgg, admitted devices wait in the protocol's stages for each other: a fleet of 5 devices
    configured with 2 workers still completes secure rounds (it runs one thread per device)."""
    srv = _server(tmp_path, SAMPLE_MESSAGES, "--round-goal", "3", "--min-count", "3", "--deadline-s", "60",
                  "--secure-aggregation", "secagg", "--secagg-stage-s", "20", "--dp-mode", "distributed",
                  "--clip-norm", "0.5", "--noise-multiplier", "0.3", "--allow-noisy-dp")
    try:
        events: list[str] = []
        config = FleetConfig(server_url=srv.url, n_devices=5, rounds=1, duration_s=150, p_eligible=1.0, p_dropout=0.0,
                             initial_messages=5, step_s=0.1, max_wait_s=0.5, workers=2, seed=3)
        report = run_fleet(config, dataset=_dataset(5), on_event=events.append)
        summary = report.summary()
        assert any(e.startswith("--workers 2 raised to 5: secure aggregation (secagg) needs a worker per device")
                   for e in events), events
        assert summary["rounds_advanced"] >= 1 and not summary["errors"], summary
        with srv.admin() as admin:
            rounds = admin.get("/v1/admin/rounds").json()
        rounds = rounds["rounds"] if isinstance(rounds, dict) else rounds
        closed = [r for r in rounds if r["kind"] == "train" and r["state"] == "closed"]
        assert closed and all(r["accepted"] >= 3 for r in closed)
    finally:
        srv.stop()


def test_progress_line_wording() -> None:
    """The fleet's progress line: round, state, secure-aggregation stage, updates submitted of the goal."""
    assert format_round_progress(None, None, None, 3) == "waiting for a round: no device was given a task yet; global v3"
    info = {"id": 7, "kind": "train", "state": "open", "goal": 10, "admitted": 13, "accepted": 4}
    line = format_round_progress(RoundSeen(7, None, 9), info, None, 2)
    assert line == "round 7 (train): open, 4 of 10 updates submitted (13 admitted, 9 devices working on it); global v2"
    sa = {"stage": "masked_input", "n_u1": 13, "n_u2": 12, "n_u3": 4}
    line = format_round_progress(RoundSeen(7, "secagg", 9), info, sa, 2)
    assert "secagg stage masked_input (keys 13, shares 12, masked 4), 4 of 10 updates submitted" in line
