"""python -m tff_sim.worker --port P: one TFF worker for `python -m tff_sim --workers HOST:P,...`.

A thin wrapper around TFF's C++ `worker_binary` (the executor service TFF starts locally for every
simulation): it starts the binary, prints one line once the binary accepts gRPC connections

    tff_sim.worker: ready on 127.0.0.1:8000 (worker_binary pid 1234)

forwards SIGINT/SIGTERM/SIGHUP to it and exits when it does. The binary never outlives the wrapper: it
is started with PR_SET_PDEATHSIG, so even a SIGKILL of the wrapper takes it down (worker_binary
ignores its parent otherwise, see tff_sim/reaper.py).

worker_binary always listens on every interface ([::]:P); --host only names the address clients use
(printed, and checked for readiness). The service is plain, unauthenticated gRPC that runs any
TensorFlow graph it is sent: keep its port on a private network or behind a firewall.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def binary_path() -> Path:
    """TFF's worker_binary inside the installed tensorflow_federated package (found without importing TFF)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tff_sim.worker: tensorflow_federated is not installed in this Python")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "worker_binary"
    if not path.is_file():
        raise SystemExit(f"tff_sim.worker: TFF's worker binary is missing: {path}")
    return path


def _die_with_parent(parent_pid: int):
    """preexec_fn: the kernel SIGKILLs the binary when this wrapper dies, however it dies."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the wrapper died before prctl took effect
            os._exit(1)

    return preexec


def port_taken(port: int) -> bool:
    """Whether something already listens on `port`. worker_binary's gRPC server sets SO_REUSEPORT, so a
    second worker on a taken port would start and silently share it with the first: check first."""
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here: try IPv4
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no listener
            sock.bind(address)
            return False
        except OSError:
            return True
        finally:
            sock.close()
    return False


def _wait_ready(proc: subprocess.Popen, address: str, timeout: float) -> bool:
    """True once a gRPC channel to `address` is READY; False if the binary exits first or time runs out."""
    import grpc

    channel = grpc.insecure_channel(address)
    deadline = time.monotonic() + timeout
    try:
        future = grpc.channel_ready_future(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                future.result(timeout=0.2)  # short slices, to notice a binary that died (port taken, say)
                return True
            except grpc.FutureTimeoutError:
                continue
        return False
    finally:
        channel.close()


def _wait(proc: subprocess.Popen, stopping: list[int], kill_after: float = 15.0) -> int:
    """The binary's exit code; SIGKILL if it is still there `kill_after` seconds after a forwarded stop."""
    stop_seen: float | None = None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stopping and stop_seen is None:
                stop_seen = time.monotonic()
            if stop_seen is not None and time.monotonic() - stop_seen > kill_after:
                proc.kill()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tff_sim.worker",
                                description="Serve one TFF worker (TFF's worker_binary) for python -m tff_sim --workers.")
    p.add_argument("--port", type=int, required=True, help="the port to serve on (all interfaces)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address clients reach this worker by, printed and checked for readiness "
                   "(0.0.0.0 / :: check through loopback); worker_binary itself listens on every interface")
    p.add_argument("--max-concurrent-calls", type=int, default=-1,
                   help="worker_binary's --max_concurrent_computation_calls (parallel client computations; "
                   "-1: no limit)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the binary to serve")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise SystemExit(f"tff_sim.worker: --port must be in 1..65535, got {args.port}")
    if port_taken(args.port):
        print(f"tff_sim.worker: port {args.port} is already in use (another worker?): pick another --port",
              file=sys.stderr, flush=True)
        return 2
    check_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(args.host, args.host)
    if ":" in check_host and not check_host.startswith("["):
        check_host = f"[{check_host}]"
    stopping: list[int] = []

    def forward(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        stopping.append(signum)
        if proc is not None and proc.poll() is None:
            # SIGINT is worker_binary's clean shutdown; forward the others as they came
            proc.send_signal(signum)

    proc: subprocess.Popen | None = None
    for sig in _FORWARDED:  # before the start: a signal during start-up must still reach the binary
        signal.signal(sig, forward)
    proc = subprocess.Popen(
        [str(binary_path()), f"--port={args.port}", f"--max_concurrent_computation_calls={args.max_concurrent_calls}"],
        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent(os.getpid()),
    )
    if stopping:  # a signal arrived between installing the handlers and the start
        proc.send_signal(stopping[0])
    if not stopping and _wait_ready(proc, f"{check_host}:{args.port}", args.ready_timeout):
        print(f"tff_sim.worker: ready on {args.host}:{args.port} (worker_binary pid {proc.pid})", flush=True)
    elif not stopping and proc.poll() is None:
        print(f"tff_sim.worker: worker_binary did not serve {check_host}:{args.port} within {args.ready_timeout:g} s",
              file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGINT)
        _wait(proc, [signal.SIGINT])
        return 1
    rc = _wait(proc, stopping)
    if stopping:
        return 128 + stopping[0]
    if rc != 0:
        print(f"tff_sim.worker: worker_binary exited with {rc} (is port {args.port} already in use?)",
              file=sys.stderr, flush=True)
    return 1 if rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
