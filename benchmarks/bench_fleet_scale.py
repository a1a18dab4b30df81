"""Fleet scale: 200 devices against one server on this machine, 3 secure DP rounds.

    .venv/bin/python benchmarks/bench_fleet_scale.py                      # 200 devices, 3 rounds, preset small
    .venv/bin/python benchmarks/bench_fleet_scale.py --devices 50 --rounds 2 --preset tiny   # a smoke run
    .venv/bin/python benchmarks/bench_fleet_scale.py --no-secagg          # distributed DP without SecAgg

One `python -m server` subprocess (preset sized to a chitchat top-k vocabulary, random weights,
DP "distributed", clip 1, noise multiplier 1, secure aggregation "secagg" when this server has it,
round goal 150 of 200 devices, min_count 120, over-admission 1.3) and one
`python -m device_app --headless --fleet 200` subprocess (200 chitchat users, each a full
DeviceClient: own SQLite text store, registration, check-ins, local SGD, clip, noise, masking,
upload; the devices share one decoded model and one Keras trainer per process, as fleet mode does;
p_eligible 0.9, p_dropout 0.05, retry-after capped at 2 s).

Measured, and written to artifacts/bench/fleet_scale.json:
- rounds completed (closed with a new model version) and abandoned;
- time per round: from the round's first admission to its close, and from the previous close;
- server and fleet peak RSS (psutil, each process with its children, sampled every 0.2 s);
- errors: server log ERROR lines and tracebacks, the fleet's device errors, HTTP rejections by reason;
- accepted vs lost updates per round: the fleet's count of uploads answered 200 (device side)
  against the server's accepted count (what it aggregated); lost = 200-OK but not aggregated.
  Uploads refused because the round had already closed (over-admitted devices arriving late) are
  counted apart: those devices were told, nothing was lost silently.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx  # noqa: E402
import psutil  # noqa: E402

from models.interrupts import Interrupted  # noqa: E402
from scripts.admin_client import server_supports_secagg  # noqa: E402
from scripts.supervisor import Supervisor, become_subreaper  # noqa: E402


class RssSampler:
    """Peak RSS of a process and its descendants."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        self.cpu0 = getattr(self, "cpu0", {})
        self.cpu0[name] = self.cpu(pid)
        self.pids[name] = pid
        self.peak.setdefault(name, 0)
        self.series.setdefault(name, [])

    @staticmethod
    def rss(pid: int) -> int:
        try:
            p = psutil.Process(pid)
            total = p.memory_info().rss
            for c in p.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0

    @staticmethod
    def cpu(pid: int) -> float:
        """User + system CPU seconds of the process and its live descendants."""
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            total = t.user + t.system
            for c in p.children(recursive=True):
                try:
                    ct = c.cpu_times()
                    total += ct.user + ct.system
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0.0

    def _run(self) -> None:
        last_series = 0.0
        while not self._stop.wait(0.2):
            now = time.monotonic() - self._t0
            self.cpu_last = getattr(self, "cpu_last", {})
            for name, pid in list(self.pids.items()):
                c = self.cpu(pid)
                if c:
                    self.cpu_last[name] = c
                r = self.rss(pid)
                self.peak[name] = max(self.peak[name], r)
                if now - last_series >= 5.0:
                    self.series[name].append((round(now, 1), r))
            if now - last_series >= 5.0:
                last_series = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def build_vocab_file(path: Path, preset_name: str) -> None:
    from models.config import preset
    from models.data import load_dataset
    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary

    ds = load_dataset("chitchat")
    size = preset(preset_name).vocab_size - 4
    vocab = Vocabulary.build((t for text in ds.all_train_sentences() for t in tokenize_sentences(text)), size=size)
    vocab.save(path)


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def rejections(metrics_text: str) -> dict[str, float]:
    """fk_uploads_total by result (accepted, repeat, or a rejection reason)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("fk_uploads_total{"):
            m = re.search(r'result="([^"]+)"', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--goal", type=int, default=None, help="round goal (default 75%% of the devices)")
    p.add_argument("--min-count", type=int, default=None, help="default 80%% of the goal")
    p.add_argument("--over-admit", type=float, default=1.3)
    p.add_argument("--preset", default="small")
    p.add_argument("--workers", type=int, default=4, help="fleet threads (with SecAgg: at least the admissions + 2)")
    p.add_argument("--no-secagg", action="store_true")
    p.add_argument("--secagg-neighbors", type=int, default=None,
                   help="SecAgg+ neighbour count (default: the server's; 0 = complete graph)")
    p.add_argument("--deadline-s", type=float, default=900.0)
    p.add_argument("--max-abandoned", type=int, default=3, help="give up after this many abandoned rounds")
    p.add_argument("--max-seconds", type=float, default=3000.0)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "fleet_scale.json")
    p.add_argument("--run-dir", type=Path, default=None, help="default runs/bench-fleet-<time>")
    args = p.parse_args(argv)
    goal = args.goal or max(1, round(0.75 * args.devices))
    min_count = args.min_count or max(1, math.floor(0.8 * goal))
    run_dir = args.run_dir or ROOT / "runs" / f"bench-fleet-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    token = "bench-" + os.urandom(12).hex()
    # server and fleet share the registration key through the environment (docs/security.md)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FK_ADMIN_TOKEN=token, FK_REGISTRATION_KEY="bench-" + os.urandom(12).hex())
    sup = Supervisor(run_dir, env)
    sampler = RssSampler()
    become_subreaper()

    def on_signal(signum, frame):  # noqa: ARG001
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    result: dict[str, Any] = {"devices": args.devices, "rounds_wanted": args.rounds, "preset": args.preset,
                              "goal": goal, "min_count": min_count, "machine": {"cpus": os.cpu_count(),
                              "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}}
    code = 0
    try:
        secagg = False
        if not args.no_secagg:
            secagg, note = server_supports_secagg()
            print(note, flush=True)
        result["secure_aggregation"] = "secagg" if secagg else "none"
        vocab_file = run_dir / "vocab.json"
        build_vocab_file(vocab_file, args.preset)
        port_file = run_dir / "server.port"
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
               "--data-dir", str(run_dir / "server"), "--init-preset", args.preset, "--vocab-file", str(vocab_file),
               "--round-goal", str(goal), "--min-count", str(min_count), "--over-admit", str(args.over_admit),
               "--deadline-s", str(args.deadline_s), "--dp-mode", "distributed", "--clip-norm", "1.0",
               "--noise-multiplier", "1.0", "--retry-min-s", "1", "--log-level", "warning",
               "--registration-burst", str(max(100, args.devices)),  # the whole fleet registers from 127.0.0.1
               "--allow-noisy-dp"]  # a scale benchmark: the model's quality is not measured
        if secagg:
            cmd += ["--secure-aggregation", "secagg"]
            if args.secagg_neighbors is not None:
                cmd += ["--secagg-neighbors", str(args.secagg_neighbors)]
        server = sup.spawn("server", cmd, echo=lambda line: line if ("ERROR" in line or "Traceback" in line) else None)
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if not server.alive or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "\n".join(server.lines[-20:]))
            time.sleep(0.1)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        while True:
            try:
                if admin.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        sampler.watch("server", server.proc.pid)
        result["server_config"] = {k: v for k, v in admin.get("/v1/admin/config").json().items()
                                   if k in ("dp_mode", "clip_norm", "noise_multiplier", "round_goal", "min_count",
                                            "over_admit", "secure_aggregation", "secagg_neighbors", "secagg_threshold")}
        print(f"server {url} (pid {server.proc.pid}); config {result['server_config']}", flush=True)
        fleet_json = run_dir / "fleet.json"
        workers = args.workers
        if secagg:  # devices wait inside SecAgg's stages: one fleet thread per admitted device
            workers = max(workers, math.ceil(goal * args.over_admit) + 2)
        result["fleet_workers"] = workers
        fcmd = [sys.executable, "-m", "device_app", "--headless", "--fleet", str(args.devices), "--dataset", "chitchat",
                "--server", url, "--rounds", str(args.rounds), "--duration", str(args.max_seconds),
                "--workers", str(workers), "--p-eligible", "0.9", "--p-dropout", "0.05", "--step", "0.5",
                "--max-wait", "2", "--seed", "7", "--data-dir", str(run_dir / "fleet"), "--json-out", str(fleet_json)]
        t0 = time.monotonic()
        fleet = sup.spawn("fleet", fcmd, echo=lambda line: line[8:] if line.startswith("[fleet] ") else
                          (line if "Traceback" in line else None))
        sampler.watch("fleet", fleet.proc.pid)
        seen: set[int] = set()
        stopped = False
        abandoned = 0
        while fleet.alive:
            if not server.alive:
                raise RuntimeError("server died:\n" + "\n".join(server.lines[-20:]))
            for r in admin.get("/v1/admin/rounds", params={"kind": "train"}).json()["rounds"]:
                if r["state"] in ("closed", "abandoned") and r["id"] not in seen:
                    seen.add(r["id"])
                    abandoned += r["state"] == "abandoned"
                    print(f"round {r['id']} {r['state']}: {r['accepted']}/{r['admitted']} "
                          f"({time.monotonic() - t0:.0f} s since the fleet started; "
                          f"RSS server {sampler.peak['server'] / 2**20:.0f} MB, fleet {sampler.peak['fleet'] / 2**20:.0f} MB)",
                          flush=True)
            if not stopped and sum(1 for r in admin.get("/v1/admin/rounds", params={"kind": "train"}).json()["rounds"]
                                   if r["state"] == "closed") >= args.rounds:
                # The fleet stops once the model advanced --rounds versions, but devices already inside
                # the next SecAgg round wait in its stages: stopping training abandons that round at once.
                admin.post("/v1/admin/training/stop")
                stopped = True
            if abandoned >= args.max_abandoned:
                print(f"{abandoned} rounds abandoned: giving up (see {run_dir / 'logs' / 'server.log'})", flush=True)
                admin.post("/v1/admin/training/stop")
                sup.stop(fleet)
                break
            time.sleep(1.0)
        fleet.reader.join(5)
        wall = time.monotonic() - t0
        # Peak RSS is of the run itself: the admin reads below (status, privacy report) are not part of it.
        sampler.stop()
        admin.post("/v1/admin/training/stop")
        time.sleep(0.5)
        rounds = sorted(admin.get("/v1/admin/rounds", params={"kind": "train"}).json()["rounds"], key=lambda r: r["id"])
        report = json.loads(fleet_json.read_text()) if fleet_json.exists() else {}
        uploads = {int(k): v for k, v in (report.get("uploads_per_round") or {}).items()}
        rows, prev_close = [], None
        for r in rounds:
            first_admission = (r["deadline"] - r["params"]["deadline_s"]) if r["deadline"] else None
            row = {"round": r["id"], "state": r["state"], "admitted": r["admitted"], "server_accepted": r["accepted"],
                   "device_200_ok": uploads.get(r["id"], 0), "dropouts": r["dropouts"],
                   "reason": (r["outcome"] or {}).get("reason"), "epsilon": r["epsilon"],
                   "result_version": r["result_version"]}
            if r["state"] == "closed":
                row["seconds_from_first_admission"] = round(r["closed_at"] - first_admission, 1) if first_admission else None
                row["seconds_from_previous_close"] = round(r["closed_at"] - prev_close, 1) if prev_close else None
                prev_close = r["closed_at"]
            row["lost"] = max(0, row["device_200_ok"] - row["server_accepted"]) if r["state"] == "closed" else None
            rows.append(row)
        closed = [r for r in rows if r["state"] == "closed"]
        not_sent: dict[str, int] = {}  # device side: uploads that did not end in a 200, by reason
        for log in (run_dir / "fleet").glob("*/sent.jsonl"):
            for line in log.read_text().splitlines():
                e = json.loads(line)
                if e.get("type") in ("update", "secagg") and e.get("status") not in ("accepted", None):
                    key = f"{e.get('type')}:{e.get('status')}:{e.get('error') or e.get('reason') or '-'}"
                    not_sent[key] = not_sent.get(key, 0) + 1
        server_log = (run_dir / "logs" / "server.log").read_text(errors="replace")
        try:
            rej = rejections(admin.get("/metrics", timeout=300).text)
        except httpx.HTTPError:
            rej = {}
        outcomes = report.get("outcomes") or {}
        result.update({
            "wall_seconds": round(wall, 1),
            "rounds_completed": len(closed),
            "rounds_abandoned": sum(1 for r in rows if r["state"] == "abandoned" and r["reason"] != "stopped"),
            "rounds": rows,
            "seconds_per_round": [r["seconds_from_first_admission"] for r in closed],
            "server_peak_rss_mb": round(sampler.peak.get("server", 0) / 2**20, 1),
            "fleet_peak_rss_mb": round(sampler.peak.get("fleet", 0) / 2**20, 1),
            "fleet_rss_per_device_mb": round(sampler.peak.get("fleet", 0) / 2**20 / args.devices, 2),
            "cpu_seconds": {k: round(getattr(sampler, "cpu_last", {}).get(k, 0.0) - sampler.cpu0.get(k, 0.0), 1)
                            for k in sampler.pids},
            "rss_series_mb": {k: [(t, round(v / 2**20)) for t, v in s] for k, s in sampler.series.items()},
            "accepted_total": sum(r["server_accepted"] for r in closed),
            "device_200_ok_total": sum(r["device_200_ok"] for r in closed),
            "lost_total": sum(r["lost"] or 0 for r in closed),
            "errors": {
                "server_error_lines": sum(1 for line in server_log.splitlines() if " ERROR " in line or "Traceback" in line),
                "fleet_device_errors": len(report.get("errors") or []),
                "fleet_error_samples": (report.get("errors") or [])[:10],
                "rejections_by_reason": rej,
            },
            "fleet_outcomes": outcomes,
            "device_side_not_accepted": not_sent,
            "fleet_uploads": report.get("uploads"),
            "upload_mb": report.get("upload_mb"),
        })
        print()
        print(f"{args.devices} devices, preset {args.preset}, secure aggregation {result['secure_aggregation']}, "
              f"goal {goal} (min {min_count}), {result['rounds_completed']} rounds completed in {wall:.0f} s")
        print(f"{'round':>5} {'state':>9} {'admitted':>8} {'accepted':>8} {'200-OK':>7} {'lost':>5} {'s(1st adm)':>10} "
              f"{'s(prev)':>8} {'epsilon':>8}")
        for r in rows:
            print(f"{r['round']:>5} {r['state']:>9} {r['admitted']:>8} {r['server_accepted']:>8} {r['device_200_ok']:>7} "
                  f"{'' if r['lost'] is None else r['lost']:>5} {r.get('seconds_from_first_admission') or '':>10} "
                  f"{r.get('seconds_from_previous_close') or '':>8} {fmt(r['epsilon']):>8}")
        print(f"peak RSS: server {result['server_peak_rss_mb']} MB, fleet {result['fleet_peak_rss_mb']} MB "
              f"({result['fleet_rss_per_device_mb']} MB per device)")
        acc = max(1, result["accepted_total"])
        print(f"CPU seconds: server {result['cpu_seconds'].get('server')} "
              f"({1000 * result['cpu_seconds'].get('server', 0) / acc:.0f} ms per accepted update), "
              f"fleet {result['cpu_seconds'].get('fleet')}; wall {wall:.0f} s on {os.cpu_count()} cores")
        print(f"errors: {result['errors']['server_error_lines']} server, {result['errors']['fleet_device_errors']} device; "
              f"uploads by result {rej}; lost updates {result['lost_total']}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"device-side uploads not answered 200, by reason: {not_sent}")
        print(f"wrote {args.out}")
        if result["rounds_completed"] < args.rounds or result["lost_total"]:
            code = 1
    except Interrupted as exc:
        print(f"{exc}: stopping", flush=True)
        code = 128 + exc.signum
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sampler.stop()
        sup.stop_all()
    return code


if __name__ == "__main__":
    sys.exit(main())
