"""tff_sim on TFF workers (--workers): two `python -m tff_sim.worker` processes on loopback.

The same seed gives the local model; a worker killed mid-round fails the round with a message naming it,
and a rerun with the worker back resumes from the checkpoint; no worker_binary is left behind.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tff_sim.workers import parse_workers

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary_pids(port: int) -> list[int]:
    """worker_binary processes serving `port` (ours only: other jobs on this machine may run TFF too)."""
    out = subprocess.run(["pgrep", "-f", f"worker_binary --port={port} "], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _wait_gone(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while _binary_pids(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class WorkerProc:
    """A `python -m tff_sim.worker` child, started and waited for by its "ready" line."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "tff_sim.worker", "--port", str(port)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        line = ""
        while "ready on" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
                self.stop()
                raise RuntimeError(f"worker on port {port} did not come up (last line {line!r})")
            line = self.proc.stdout.readline()
        sel.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()


def test_parse_workers():
    assert parse_workers("Host-A:8000, 10.0.0.2:9000,[::1]:7000") == ("host-a:8000", "10.0.0.2:9000", "[::1]:7000")
    assert parse_workers(["a:1", "b:2"]) == ("a:1", "b:2")
    for bad in ("", "a", "a:", ":80", "a:0", "a:70000", "::1:80", "a:1,a:1", "a:x"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_unreachable_worker_is_named_with_the_command_that_starts_it():
    from tff_sim.workers import reachability_problem

    port = _free_port()
    problem = reachability_problem(f"127.0.0.1:{port}", timeout=1.0)
    assert problem is not None and f"127.0.0.1:{port}" in problem
    assert f"python -m tff_sim.worker --port {port}" in problem


def test_worker_wrapper_forwards_sigterm_and_refuses_a_taken_port():
    worker = WorkerProc(_free_port())
    try:
        assert len(_binary_pids(worker.port)) == 1
        # worker_binary's gRPC server sets SO_REUSEPORT: a second one would silently share the port
        second = subprocess.run([sys.executable, "-m", "tff_sim.worker", "--port", str(worker.port)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "already in use" in second.stderr
    finally:
        assert worker.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    assert _wait_gone(worker.port)


# ----------------------------------------------------------------------------------- simulations

tff = pytest.importorskip("tensorflow_federated")

from tff_sim import checkpoint, client_data, workers  # noqa: E402
from tff_sim.config import SimConfig  # noqa: E402
from tff_sim.runner import run  # noqa: E402

# eval_every 0: the federated evaluation (on the workers too) runs only after the last round
FAST = dict(preset="tiny", max_train_clients=8, clients_per_round=4, max_examples_per_client=32, batch_size=16,
            eval_every=0, eval_clients=2, eval_max_examples_per_client=32, final_eval_max_sentences=100,
            tensorboard=False, plots=False, progress=False, baselines=None, checkpoint_every=1, rounds=3)


@pytest.fixture(scope="module")
def data():
    return client_data.prepare("chitchat", preset_name="tiny", max_train_clients=8, eval_clients=2,
                               eval_max_examples_per_client=32, final_eval_max_sentences=100)


@pytest.fixture(scope="module")
def pool():
    """Two loopback workers; on teardown they are stopped and no worker_binary of theirs is left."""
    procs = [WorkerProc(_free_port()), WorkerProc(_free_port())]
    try:
        yield procs  # a test may replace an entry (a killed worker restarted)
    finally:
        for w in procs:
            w.stop()
        for w in procs:
            assert _wait_gone(w.port), f"worker_binary on port {w.port} left running"


@pytest.fixture(scope="module")
def local(data, tmp_path_factory):
    return run(SimConfig(**FAST, output=str(tmp_path_factory.mktemp("local"))), data)


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_two_workers_give_the_local_model_and_count_the_bytes(data, pool, local, tmp_path):
    spec = ",".join(w.address for w in pool)
    remote = run(SimConfig(**FAST, output=str(tmp_path / "w2"), workers=spec), data)
    assert _close(remote.weights, local.weights) < 1e-5
    assert _close(local.weights, process_initial(data)) > 1e-2  # it trained: the comparison can fail
    rows = [r for r in remote.history if r["round"] > 0]
    assert [r["workers"] for r in rows] == [2, 2, 2]
    assert all(r["bytes_to_workers"] > 0 and r["bytes_from_workers"] > 0 for r in rows)
    assert "workers" not in local.history[-1]  # a local run has no worker columns
    assert remote.summary["workers"]["count"] == 2 and "workers" not in local.summary
    assert "Clients on 2 TFF worker(s)" in (remote.output / "report.md").read_text()
    assert workers.current() is None  # TFF's local context is back: a local run still works
    assert remote.summary["final"]["test"]["top1_recall"] == pytest.approx(local.summary["final"]["test"]["top1_recall"],
                                                                          abs=1e-4)


def process_initial(data):
    from tff_sim import process

    return process.initial_weights(data.model_config, 0)


def test_a_worker_killed_mid_round_fails_clearly_and_the_rerun_resumes(data, pool, local, tmp_path):
    cfg = SimConfig(**FAST, output=str(tmp_path / "kill"), workers=",".join(w.address for w in pool))
    victim = pool[1]

    def kill_in_round_2(row):
        if row["round"] != 1:
            return
        target = workers.current().workers[1]
        calls = target.snapshot().calls

        def kill_once_round_2_reaches_it():
            while target.snapshot().calls == calls:  # round 2's first call to this worker
                time.sleep(0.002)
            os.kill(victim.proc.pid, signal.SIGKILL)  # the machine is gone: no clean shutdown

        threading.Thread(target=kill_once_round_2_reaches_it, daemon=True).start()

    with pytest.raises(workers.WorkerLost) as failure:
        run(cfg, data, on_round=kill_in_round_2)
    message = str(failure.value)
    assert victim.address in message and f"python -m tff_sim.worker --port {victim.port}" in message
    assert "rerun the same command" in message
    assert _wait_gone(victim.port, 10), "the killed wrapper's worker_binary outlived it"
    done = int(checkpoint.read_header(cfg.output_dir())["round"])
    assert done in (1, 2)  # round 2 failed (or, had the kill landed after its part, round 3)
    victim.stop()
    pool[1] = WorkerProc(victim.port)  # the worker is back, at the same address
    resumed = run(cfg, data)
    assert resumed.summary["resumed_from"] == done
    assert _close(resumed.weights, local.weights) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dp", [
    dict(dp=True, noise_multiplier=0.5, clip=0.5, adaptive_clip=True),  # DP-FedAvg, adaptive clip, seeded noise
    dict(dp=True, noise_multiplier=0.5, clip=0.5, dp_mechanism="dp-ftrl", server_optimizer="sgd"),  # DP-FTRL tree
], ids=["dp-fedavg-adaptive", "dp-ftrl"])
def test_dp_processes_split_across_workers_give_the_local_model(data, pool, tmp_path, dp):
    """TFF compiles the DP aggregators to mergeable form too: the clipped sums merge, the (seeded) noise is
    drawn once, on the server side, after the merge -- the same weights as the local run."""
    cfg = SimConfig(**{**FAST, "rounds": 2}, allow_noisy_dp=True, **dp)
    local_dp = run(cfg.replace(output=str(tmp_path / "local")), data)
    remote = run(cfg.replace(output=str(tmp_path / "w2"), workers=",".join(w.address for w in pool)), data)
    assert _close(remote.weights, local_dp.weights) < 1e-5
    assert _close(local_dp.weights, process_initial(data)) > 1e-2
