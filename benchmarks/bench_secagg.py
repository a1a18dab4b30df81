"""Secure aggregation benchmark: a SecAgg round vs a plain round for 10 / 50 / 100 devices, and where the
time goes.

    .venv/bin/python benchmarks/bench_secagg.py                          # small preset, 10 50 100 devices
    .venv/bin/python benchmarks/bench_secagg.py --preset gboard --devices 10 50 100 --neighbors 14

Device compute is measured as each device thread's CPU time (time.thread_time), so time spent waiting for
the GIL, the network or the other devices is not counted as a device's own work.

Each measurement is one training round on a fresh `python -m server` subprocess (its own SQLite file and
data dir, dp_mode distributed, clip 1, z 1) with N synthetic devices (device_app/privacy_sim.SimDevice:
the real device-side protocol over HTTP, one thread per device, precomputed clipped deltas, no local
training). round_goal = min_count = N, over_admit 1: every device is in the round.

    plain   check-in, wire-encode the float32 delta, upload (validated, written, fsynced, summed), aggregate
    secagg  check-in, advertise keys (signed), share keys (Shamir + AES-GCM), quantize + mask, upload
            (added into the durable running modular sum), consistency signatures, unmasking shares,
            server reconstruction + unmasking, aggregate

Reported per (N, mode): the round's wall time from the first check-in to the new model version
(server timestamps), the server process's CPU seconds in that window, the devices' protocol compute
(mean and max per device), upload bytes per device, and for SecAgg the duration of each stage.

Two views of the same round:

* all on this machine: the N simulated devices share this machine's cores (and one Python process, one
  GIL) with the server, so their crypto is serialised into the wall time, which a real fleet (one phone
  per device) does in parallel. The CPU floor line says how far even perfect scheduling could get:
  (server CPU + every device's CPU) / cores.
* devices on their own CPUs (the ratio the goal is about): the round is run again in lockstep
  (device_app.privacy_sim.Lockstep): before each message, every device waits until all have computed
  theirs. Each step's time is then the slowest device's compute for that message (its thread CPU time)
  plus the server's busy time for it: its process CPU time from the moment all messages were ready to
  the next step (for the last message, to the new model version). See critical_path() for why CPU
  time rather than the step's wall time, which is also reported. Nothing is modelled but the
  parallelism of the devices; check-ins and identity registration (once per device, not per round) are
  left out of both modes.

Neither mode includes local training, which dominates a real round (seconds to minutes per device) and
is the same in both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_app.privacy_sim import Lockstep, SimDevice, run_round  # noqa: E402
from models.config import preset  # noqa: E402
from tests.server_fixtures import ServerProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_deltas(dim: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(dim).astype(np.float32)
        x *= np.float32(0.9 / np.linalg.norm(x))
        out.append(x)
    return out


# Lockstep model: which message label's release starts which server stage, and which device timings
# are the compute a device does for that message (see device_app/secagg.py).
SECAGG_STEPS = (  # (message label, server stage it closes or None for the end of the round, device timings)
    ("advertise_keys", "advertise", ("advertise_compute_s",)),
    ("share_keys", "share", ("verify_keys_s", "share_compute_s")),
    ("masked_input", "masked", ("decrypt_shares_s", "mask_s")),
    ("consistency", "consistency", ("consistency_compute_s",)),
    ("unmasking", None, ("unmask_compute_s",)),
)


def critical_path(mode: str, released: dict[str, float], cpu_at: dict[str, float], cpu_end: float, rnd: dict,
                  results: list) -> dict:
    """Round time with every device on its own CPU: per step, the slowest device's compute for its
    message plus the server's busy time for the step.

    The server's busy time is its process CPU time from the moment all messages were ready to the
    next step's release (or the new model version): the devices of this harness share one Python
    process, so the wall time of a step also holds their serialised HTTP client work (reported as
    server_wall_s), which a real fleet does in parallel. CPU time counts a second core used in
    parallel twice, so it overstates the server's time a little, for both modes alike."""
    steps = SECAGG_STEPS if mode == "secagg" else (("update", None, ("encode_s",)),)
    stages = (rnd.get("secure_aggregation") or {}).get("stages", {})
    labels = [s[0] for s in steps]
    out = {}
    for i, (label, stage, keys) in enumerate(steps):
        device = max(sum(x.timings.get(k, 0.0) for k in keys) for x in results)
        end = stages[stage]["closed"] if stage else rnd["closed_at"]
        nxt = cpu_at[labels[i + 1]] if i + 1 < len(labels) else cpu_end
        out[label] = {"device_max_s": device, "server_s": nxt - cpu_at[label], "server_wall_s": end - released[label]}
    out["total_s"] = sum(v["device_max_s"] + v["server_s"] for v in out.values())
    return out


def run_one(workdir: Path, preset_name: str, n: int, mode: str, deltas: list[np.ndarray], seed: int,
            neighbors: int = 0, lockstep: bool = False) -> dict:
    cfg = preset(preset_name)
    name = f"{mode}-{n}-{seed}{'-lockstep' if lockstep else ''}"
    args = ["--init-preset", preset_name, "--round-goal", str(n), "--min-count", str(n), "--over-admit", "1.0",
            "--dp-mode", "distributed", "--clip-norm", "1.0", "--noise-multiplier", "1.0", "--deadline-s", "3600",
            "--secagg-stage-s", "600", "--tick-s", "0.05", "--upload-dtypes", "float32",
            "--allow-noisy-dp"]  # a protocol-cost benchmark: the model's quality is not measured
    if mode == "secagg":
        args += ["--secure-aggregation", "secagg", "--secagg-neighbors", str(neighbors if neighbors < n - 1 else 0)]
    srv = ServerProcess(workdir / name, args, workdir / f"{name}.log").start().wait_warm()
    try:
        client = httpx.Client(base_url=srv.url, timeout=httpx.Timeout(600.0, connect=30.0),
                              limits=httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16))
        devs = [SimDevice(srv.url, seed=seed * 1000 + i, client=client) for i in range(n)]
        # noise as the devices of a distributed-DP round add it (precomputed: not part of the protocol cost)
        stddev = 1.0 / np.sqrt(n)
        rng = np.random.default_rng(seed)
        noisy = [d + rng.standard_normal(d.size).astype(np.float32) * np.float32(stddev) for d in deltas[:n]]
        cpu0 = cpu_seconds(srv.proc.pid)
        t0 = time.time()
        cpu_at: dict[str, float] = {}
        step = Lockstep(n, on_release=lambda label: cpu_at.setdefault(label, cpu_seconds(srv.proc.pid))) \
            if lockstep else None
        results = run_round(devs, noisy, config=cfg, lockstep=step)
        rid = devs[0].task.round_id
        r = srv.wait_round(rid, timeout=3600)
        cpu1 = cpu_seconds(srv.proc.pid)
        bad = [x.detail for x in results if x.status != "uploaded"]
        if r["state"] != "closed" or bad:
            raise RuntimeError(f"{name}: round {r['state']} {r.get('outcome')} {bad[:3]}")
        wall = r["closed_at"] - t0
        if step is not None:
            return {"devices": n, "mode": mode,
                    "critical_path": critical_path(mode, step.released, cpu_at, cpu1, r, results)}
        dev_seconds = [x.seconds for x in results]
        out = {"devices": n, "mode": mode, "wall_s": wall, "server_cpu_s": cpu1 - cpu0,
               "device_protocol_s_mean": statistics.mean(dev_seconds), "device_protocol_s_max": max(dev_seconds),
               "device_seconds_sum": sum(dev_seconds), "upload_bytes": statistics.mean(x.bytes for x in results)}
        if mode == "secagg":
            info = r["secure_aggregation"]
            stages = info["stages"]
            out["stages_s"] = {s: stages[s]["closed"] - stages[s]["opened"] for s in stages if "closed" in stages[s]}
            out["stages_s"]["aggregate"] = r["closed_at"] - stages["done"]["opened"]
            out["server_ingest_s"] = info.get("ingest_seconds")
            out["server_unmask_s"] = info.get("finish_seconds")
            keys = sorted({k for x in results for k in x.timings})
            out["device_compute_s_mean"] = {k: statistics.mean(x.timings.get(k, 0.0) for x in results) for k in keys}
            # a device's own work (its compute); its wall time also includes waiting for the others
            own = [sum(x.timings.values()) for x in results]
            out["device_compute_s_sum"], out["device_compute_s_max"] = sum(own), max(own)
        else:  # plain devices only encode (then upload)
            own = [x.timings["encode_s"] for x in results]
            out["device_compute_s_mean"] = {"encode_s": statistics.mean(own)}
            out["device_compute_s_sum"], out["device_compute_s_max"] = sum(own), max(own)
        client.close()
        return out
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "gboard"])
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--runs", type=int, default=3, help="rounds per (N, mode); medians reported")
    ap.add_argument("--neighbors", type=int, default=0,
                    help="SecAgg+ neighbour graph degree (0: every device with every other, Bonawitz et al.)")
    ap.add_argument("--workdir")
    ap.add_argument("--output", default=None, help="JSON results (default artifacts/bench/secagg_<preset>.json)")
    args = ap.parse_args()
    cfg = preset(args.preset)
    dim = cfg.num_parameters()
    deltas = make_deltas(dim, max(args.devices), 0)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-secagg-"))
    rows = []
    for n in args.devices:
        per_mode = {}
        for mode in ("plain", "secagg"):
            runs = [run_one(workdir, args.preset, n, mode, deltas, seed, args.neighbors) for seed in range(args.runs)]
            best = sorted(runs, key=lambda x: x["wall_s"])[len(runs) // 2]
            per_mode[mode] = best
            print(f"{args.preset}{'' if mode == 'plain' or not args.neighbors else f' k={args.neighbors}'} N={n:4d} "
                  f"{mode:6s}: wall {best['wall_s']:7.2f}s  server cpu {best['server_cpu_s']:6.2f}s  device cpu mean "
                  f"{best['device_compute_s_sum'] / n * 1000:.1f}ms max {best['device_compute_s_max'] * 1000:.1f}ms  "
                  f"upload {best['upload_bytes'] / 1e6:.2f} MB", flush=True)
            if mode == "secagg":
                print("    stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in best["stages_s"].items()))
            print("    device CPU per device: " + ", ".join(
                f"{k} {v * 1000:.1f}ms" for k, v in best["device_compute_s_mean"].items()))
        # The same round again, devices in lockstep: the deployment view. Plain and SecAgg runs alternate
        # so that a slower or faster spell of this (shared) machine falls on both; the ratio reported is
        # the median of the per-pair ratios, the stage figures those of the median SecAgg run.
        pairs = []
        for seed in range(args.runs):
            pairs.append({mode: run_one(workdir, args.preset, n, mode, deltas, seed, args.neighbors,
                                        lockstep=True)["critical_path"] for mode in ("plain", "secagg")})
        for mode in ("plain", "secagg"):
            runs = [x[mode] for x in pairs]
            per_mode[mode]["critical_path"] = sorted(runs, key=lambda x: x["total_s"])[len(runs) // 2]
            per_mode[mode]["critical_path_runs_s"] = [x["total_s"] for x in runs]
        pair_ratios = [x["secagg"]["total_s"] / x["plain"]["total_s"] for x in pairs]
        p, s = per_mode["plain"], per_mode["secagg"]
        cp = {m: per_mode[m]["critical_path"] for m in per_mode}
        print("    devices on their own CPUs (lockstep): plain {:.2f}s, secagg {:.2f}s = ".format(
            cp["plain"]["total_s"], cp["secagg"]["total_s"]) + " + ".join(
            f"{k} {v['device_max_s'] * 1000:.0f}ms+{v['server_s']:.2f}s" for k, v in cp["secagg"].items()
            if k != "total_s"), flush=True)
        cores = os.cpu_count() or 1
        # Every CPU second of the server and of the N simulated devices has to run on this machine's cores:
        # (server CPU + all devices' protocol CPU) / cores is a lower bound on the wall time here.
        floor = {m: (x["server_cpu_s"] + x["device_compute_s_sum"]) / cores for m, x in per_mode.items()}
        row = {"devices": n, "plain": p, "secagg": s, "wall_ratio": s["wall_s"] / p["wall_s"],
               "server_cpu_ratio": s["server_cpu_s"] / max(p["server_cpu_s"], 1e-9),
               "cpu_floor_s": floor, "cpu_floor_wall_ratio": floor["secagg"] / p["wall_s"],
               "critical_path_ratio": statistics.median(pair_ratios), "critical_path_pair_ratios": pair_ratios}
        rows.append(row)
        print(f"    ratio secagg/plain: devices on their own CPUs {row['critical_path_ratio']:.2f}x (goal <= 1.5x at 100; "
              f"median of {len(pair_ratios)} alternating pairs: {', '.join(f'{r:.2f}' for r in pair_ratios)}), "
              f"all on this machine: wall {row['wall_ratio']:.2f}x, server cpu {row['server_cpu_ratio']:.2f}x "
              f"(load average {os.getloadavg()[0]:.1f} on {cores} cores)", flush=True)
        print(f"    CPU floor on this machine: secagg needs >= {floor['secagg']:.2f}s of wall on {cores} cores "
              f"(server + every device's CPU), i.e. >= {row['cpu_floor_wall_ratio']:.2f}x the plain round's wall, "
              f"however well it is scheduled", flush=True)
    suffix = f"_k{args.neighbors}" if args.neighbors else ""
    out = Path(args.output or ROOT / "artifacts" / "bench" / f"secagg_{args.preset}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "parameters": dim, "cpus": os.cpu_count(),
                               "neighbors": args.neighbors, "load_average": os.getloadavg(), "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
