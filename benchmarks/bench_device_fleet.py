"""Fleet mode load test: how many devices per round this machine sustains (devices and server on
the same machine, over loopback).

    .venv/bin/python benchmarks/bench_device_fleet.py                         # gboard, goals 10 and 25
    .venv/bin/python benchmarks/bench_device_fleet.py --goals 10,25,50 --rounds 3 --preset small

For each round goal G: a fresh `python -m server` subprocess (the preset sized to a chitchat
top-k vocabulary, random weights, DP "distributed" with clip 1 and noise multiplier 1, goal G,
min_count G) and a fleet of ceil(1.3 G) simulated devices (chitchat users, always eligible, no
dropouts, retry-after capped at 1 s) run --rounds rounds. From the server's round records:
the seconds from a round's first admission to its close. Every device does the full job:
check-in, model download when the version changes, SGD on its own messages (1 epoch, batch 16),
delta, clip, noise, wire encode, upload of the full float32 delta (5.7 MB for gboard); the server
validates, fsyncs and aggregates.
Reported: median round seconds, updates/s, and what that rate sustains: devices per 60-s round
and per round at the server's default 600-s deadline. The machine's cores are shared by the
devices and the server, so this is a floor for a real deployment (devices train on their own CPUs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx  # noqa: E402

from device_app.fleet import FleetConfig, run_fleet  # noqa: E402
from models.config import preset  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.tokenizer import tokenize_sentences  # noqa: E402
from models.vocab import Vocabulary  # noqa: E402
from tests.server_fixtures import ADMIN_TOKEN, ServerProcess  # noqa: E402


def run_goal(goal: int, args: argparse.Namespace, vocab_file: Path, dataset, root: Path) -> dict:
    srv = ServerProcess(
        root / f"srv-{goal}",
        ["--init-preset", args.preset, "--vocab-file", str(vocab_file), "--round-goal", str(goal), "--min-count",
         str(goal), "--deadline-s", "3600", "--dp-mode", "distributed", "--clip-norm", "1.0", "--noise-multiplier",
         "1.0", "--retry-min-s", "1",
         "--allow-noisy-dp"],  # a speed benchmark: the model's quality is not measured
        root / f"srv-{goal}.log",
    ).start()
    try:
        n = math.ceil(goal * 1.3)
        config = FleetConfig(server_url=srv.url, n_devices=n, rounds=args.rounds, duration_s=args.max_seconds,
                             p_eligible=1.0, p_dropout=0.0, initial_messages=args.messages, messages_per_step=1,
                             step_s=0.2, max_wait_s=1.0, workers=args.workers, seed=goal)
        t0 = time.monotonic()
        report = run_fleet(config, dataset=dataset)
        wall = time.monotonic() - t0
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as admin:
            rounds = admin.get("/v1/admin/rounds", params={"kind": "train"}).json()
        rounds = rounds["rounds"] if isinstance(rounds, dict) else rounds
        closed = [r for r in rounds if r["kind"] == "train" and r["state"] == "closed" and r["closed_at"]]
        durations = [r["closed_at"] - (r["deadline"] - 3600) for r in closed]
        summary = report.summary()
    finally:
        srv.stop()
    med = statistics.median(durations) if durations else float("nan")
    rate = goal / med if durations else 0.0
    return {
        "goal": goal,
        "devices": n,
        "rounds_closed": len(closed),
        "round_seconds": durations,
        "median_round_s": med,
        "updates_per_s": rate,
        "sustained_devices_per_60s_round": int(rate * 60),
        "sustained_devices_per_600s_round": int(rate * 600),
        "fleet_wall_s": wall,
        "fleet": {k: summary[k] for k in ("uploads", "uploads_per_s", "train_seconds", "upload_mb", "outcomes", "errors")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gboard")
    ap.add_argument("--goals", default="10,25", help="round goals to try, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--messages", type=int, default=40, help="messages each device has typed before it starts")
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        ds = load_dataset("chitchat")
        size = preset(args.preset).vocab_size - 4
        vocab = Vocabulary.build((t for s in ds.all_train_sentences() for t in tokenize_sentences(s)), size=size)
        vocab.save(root / "vocab.json")
        results = []
        for goal in [int(g) for g in args.goals.split(",")]:
            r = run_goal(goal, args, root / "vocab.json", ds, root)
            results.append(r)
            print(f"goal {goal:4d} ({r['devices']} devices): {r['rounds_closed']} rounds, median "
                  f"{r['median_round_s']:.1f} s per round, {r['updates_per_s']:.2f} updates/s -> sustains "
                  f"{r['sustained_devices_per_60s_round']} devices per 60-s round, "
                  f"{r['sustained_devices_per_600s_round']} per 600-s round; errors: {len(r['fleet']['errors'])}",
                  flush=True)
        out = {"preset": args.preset, "cpus": os.cpu_count(), "results": results}
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
