"""Server ingest benchmark: uploads/s of gboard-size deltas from N concurrent devices over loopback,
against the floor of parsing and adding the same payloads in one process; plus the server's peak
memory during a 1,000-update round.

    .venv/bin/python benchmarks/bench_server_ingest.py                  # defaults below
    .venv/bin/python benchmarks/bench_server_ingest.py --uploads 256 --runs 5 --concurrency 8 --big-round 1000

What is measured
* floor: in this process, for each payload: models.wire.decode (checksum, layout, finiteness) and
  adding it into a float64 running sum (server.aggregation.MeanAccumulator): the least work any
  server must do per upload.
* server: a real `python -m server` subprocess (gboard preset, 1.42M float32 parameters, its own
  SQLite file and data dir under a temp dir). Each run is one training round of --uploads devices,
  all registered and admitted beforehand; the timer covers the uploads only, from the first byte sent
  to the last 200 received, with --concurrency client threads (one HTTP connection each). Each
  accepted upload was validated, written + fsynced and committed (durable) before its 200.
* ratio = server uploads/s / floor uploads/s, from medians of runs done in the same invocation.
* peak memory: VmHWM (peak resident set) of a fresh server process that ran one round of
  --big-round uploads (aggregation included), next to its resident set right after start.
Not a timed test: it prints numbers; the goal is ratio >= 0.5.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import dp, wire  # noqa: E402
from models.config import preset  # noqa: E402
from server.aggregation import MeanAccumulator  # noqa: E402

ADMIN = "bench-admin"
REGISTRATION_KEY = "bench-registration-key"
ELIGIBLE = {"charging": True, "unmetered": True, "idle": True}


def make_payloads(config, count: int, base_version: int = 1, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        tensors = [rng.standard_normal(shape).astype(np.float32) for _, shape in config.weight_specs()]
        tensors, _ = dp.clip_by_global_norm(tensors, 1.0)
        out.append(wire.encode(tensors, config, kind="delta", model_version=base_version, dtype="float32",
                               metadata={"num_examples": 10 + i, "metrics": {"loss": 4.0}}))
    return out


def floor_rate(config, payloads: list[bytes], n: int) -> float:
    acc = MeanAccumulator(config.num_parameters())
    t0 = time.perf_counter()
    for i in range(n):
        p = wire.decode(payloads[i % len(payloads)], config, expected_kind="delta")
        acc.add(p.tensors, float(p.metadata["num_examples"]))
    return n / (time.perf_counter() - t0)


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    """A `python -m server` subprocess (gboard preset). `extra`: more flags (e.g. --database, --cluster);
    `name`: its port and log files' name (processes sharing a data dir differ in it)."""

    def __init__(self, workdir: Path, goal: int, extra: Sequence[str] = (), name: str | None = None) -> None:
        self.data = workdir / f"data-{goal}"
        name = name or str(goal)
        port_file = workdir / f"port-{name}"
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
               "--data-dir", str(self.data), "--admin-token", ADMIN, "--init-preset", "gboard",
               "--round-goal", str(goal), "--min-count", str(goal), "--over-admit", "1.0", "--deadline-s", "3600",
               "--clip-norm", "1.0", "--log-level", "warning",
               # each run's round trains the previous round's result: no evaluation round between them
               "--release-gate", "off",
               # every device registers from 127.0.0.1: the key, and no per-address limit
               "--registration-key", REGISTRATION_KEY, "--registration-rate-per-s", "0", *extra]
        self.log = open(workdir / f"server-{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((workdir / f"server-{name}.log").read_text())
            if port_file.exists() and port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    health = httpx.get(self.url + "/healthz", timeout=2)
                    if health.status_code == 200 and health.json().get("warm"):  # start-up imports done
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def admit_devices(srv: Server, n: int, concurrency: int) -> tuple[list[str], int]:
    """Register and check in n devices; returns their tokens and the round id they were admitted to."""
    def one(_):
        with httpx.Client(base_url=srv.url, timeout=600) as c:
            token = c.post("/v1/devices/register", json={"registration_key": REGISTRATION_KEY}).json()["token"]
            answer = c.post("/v1/checkin", json={"eligibility": ELIGIBLE},
                            headers={"Authorization": f"Bearer {token}"}).json()
            assert answer["action"] == "train", answer
            return token, answer["task"]["round_id"]
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(one, range(n)))
    rounds = {r for _, r in got}
    assert len(rounds) == 1, rounds
    return [t for t, _ in got], rounds.pop()


class Uploader:
    """One keep-alive HTTP/1.1 connection (stdlib http.client, TCP_NODELAY).

    Device-side cost is kept out of the measurement: the body goes out in one sendall. (httpx would
    also do, with the body given as an iterator of 256 KB chunks and an explicit Content-Length:
    httpcore sends a `bytes` body with `buf = buf[n:]` after every partial send, which copies the
    rest of a 5.7 MB body each time the socket buffer fills, quadratic under load.)
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
            "Content-Length": str(len(body))})
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


def upload_all(srv: Server, tokens: list[str], round_id: int, payloads: list[bytes], concurrency: int,
               urls: Sequence[str] | None = None) -> float:
    """Upload one payload per device from `concurrency` connections; seconds from first send to last 200.
    `urls`: connection i goes to urls[i % len(urls)] (default: the server's)."""
    urls = list(urls or [srv.url])
    queue = list(enumerate(tokens))
    lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(concurrency + 1)

    def worker(url: str) -> None:
        up = Uploader(url)
        start.wait()
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    i, token = queue.pop()
                status, text = up.post(f"/v1/rounds/{round_id}/update", token, payloads[i % len(payloads)])
                if status != 200:
                    errors.append(text.decode(errors="replace"))
        finally:
            up.close()

    threads = [threading.Thread(target=worker, args=(urls[i % len(urls)],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()  # connections are open: time the uploads only
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} uploads failed, first: {errors[0]}")
    return elapsed


def wait_closed(srv: Server, round_id: int) -> dict:
    with srv.admin() as c:
        while True:
            r = c.get(f"/v1/admin/rounds/{round_id}").json()
            if r["state"] in ("closed", "abandoned"):
                return r
            time.sleep(0.2)


def add_load_args(ap: argparse.ArgumentParser) -> None:
    """The load's flags, shared with benchmarks/bench_cluster_ingest.py."""
    # 256: a run then lasts ~2.5 s; with 64 (0.6 s) the pipeline's fill and drain (the first and last
    # uploads find the other connections idle) weigh ~10% against the server, while the floor is a
    # steady-state loop.
    ap.add_argument("--uploads", type=int, default=256, help="uploads per timed run (one round)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (of each setting)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent client connections, in all")
    ap.add_argument("--distinct", type=int, default=8, help="distinct payloads (reused round-robin)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(ap)
    ap.add_argument("--big-round", type=int, default=1000, help="updates in the peak-memory round (0: skip)")
    ap.add_argument("--workdir", help="keep server data here instead of a temp dir")
    args = ap.parse_args()

    config = preset("gboard")
    print(f"model: gboard preset, {config.num_parameters():,} float32 parameters; "
          f"{os.cpu_count()} CPUs; concurrency {args.concurrency}")
    payloads = make_payloads(config, args.distinct)  # each round trains on the previous round's result
    print(f"payload: {len(payloads[0]) / 1e6:.2f} MB wire float32 delta")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        floors, rates, cpu_ms, floor_cpu_ms, client_ms = [], [], [], [], []
        srv = Server(workdir, args.uploads)
        try:
            for run in range(args.runs):
                payloads = make_payloads(config, args.distinct, base_version=run + 1)
                c0 = time.process_time()
                floors.append(floor_rate(config, payloads, args.uploads))
                floor_cpu_ms.append((time.process_time() - c0) / args.uploads * 1000)
                tokens, rid = admit_devices(srv, args.uploads, args.concurrency)
                cpu0, client0 = srv.cpu_seconds(), time.process_time()
                elapsed = upload_all(srv, tokens, rid, payloads, args.concurrency)
                cpu_ms.append((srv.cpu_seconds() - cpu0) / args.uploads * 1000)
                client_ms.append((time.process_time() - client0) / args.uploads * 1000)
                rates.append(args.uploads / elapsed)
                rnd = wait_closed(srv, rid)
                assert rnd["state"] == "closed" and rnd["accepted"] == args.uploads, rnd
                print(f"run {run + 1}: floor {floors[-1]:6.1f} uploads/s | server {rates[-1]:6.1f} uploads/s "
                      f"({args.uploads} uploads in {elapsed:.2f} s) | ratio {rates[-1] / floors[-1]:.2f} | CPU per "
                      f"upload: floor {floor_cpu_ms[-1]:.1f} ms, server {cpu_ms[-1]:.1f} ms, clients {client_ms[-1]:.1f} ms")
        finally:
            srv.stop()
        f_med, s_med = statistics.median(floors), statistics.median(rates)
        print(f"median floor (decode + add, one process): {f_med:.1f} uploads/s "
              f"= {f_med * len(payloads[0]) / 1e6:.0f} MB/s")
        print(f"median server (HTTP, validate, fsync, commit, add; {args.concurrency} clients): {s_med:.1f} uploads/s "
              f"= {s_med * len(payloads[0]) / 1e6:.0f} MB/s")
        print(f"ratio server/floor: {s_med / f_med:.2f} (goal >= 0.5)")
        print(f"median CPU time per upload (user + system, all threads): floor {statistics.median(floor_cpu_ms):.1f} ms, "
              f"server process {statistics.median(cpu_ms):.1f} ms, client process {statistics.median(client_ms):.1f} ms; "
              f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        if args.big_round:
            payloads = make_payloads(config, args.distinct, base_version=1)
            srv = Server(workdir, args.big_round)
            try:
                start_rss = rss_kb(srv.proc.pid, "VmRSS")
                tokens, rid = admit_devices(srv, args.big_round, args.concurrency)
                elapsed = upload_all(srv, tokens, rid, payloads, args.concurrency)
                t0 = time.perf_counter()
                rnd = wait_closed(srv, rid)
                agg = time.perf_counter() - t0
                peak = rss_kb(srv.proc.pid, "VmHWM")
                assert rnd["state"] == "closed" and rnd["accepted"] == args.big_round, rnd
                print(f"{args.big_round}-update round: ingest {args.big_round / elapsed:.1f} uploads/s "
                      f"({elapsed:.1f} s), aggregation done {agg:.2f} s after the last upload")
                print(f"server memory: {start_rss / 1024:.0f} MiB after start, peak {peak / 1024:.0f} MiB "
                      f"during the {args.big_round}-update round "
                      f"(the deltas alone would be {args.big_round * config.num_parameters() * 4 / 2**30:.1f} GiB)")
            finally:
                srv.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
