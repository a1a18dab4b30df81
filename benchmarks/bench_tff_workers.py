"""TFF round time and transfer: local vs 1 vs 2 loopback workers (`python -m tff_sim.worker`), one process.

    .venv/bin/python benchmarks/bench_tff_workers.py                       # gboard preset, 10 clients per round
    .venv/bin/python benchmarks/bench_tff_workers.py --preset tiny --rounds 8 --json /tmp/workers.json

The same learning process runs three ways from the same initial weights on the same sampled clients:
TFF's local context (its own worker_binary), one worker (the whole round there, as locally) and two
workers (TFF's mergeable context: half the cohort each, partial aggregates merged, one server step).
Rounds alternate between the three, so a load spike on a shared machine hits all of them; the first
round of each (compilation) is left out. The script checks the three end at the same weights, then
prints the median round time, the ratios to local, the bytes each way per round (serialized gRPC
payloads counted on the client side, by kind), and each worker_binary's CPU seconds per round.
On one machine the workers share its cores: the ratio shows the overhead of splitting, not the
speed-up that separate machines would give; the per-worker CPU split is what scales.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def start_worker() -> tuple[subprocess.Popen, str, int]:
    """A `python -m tff_sim.worker` on a free loopback port; returns it, its address and its binary's pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tff_sim.worker", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line, deadline = "", time.monotonic() + 120
    while "ready on" not in line:
        if proc.poll() is not None or not sel.select(max(0.0, deadline - time.monotonic())):
            raise SystemExit(f"worker on port {port} did not start")
        line = proc.stdout.readline()
    pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
    return proc, f"127.0.0.1:{port}", pid


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gboard")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mode (the first one is warm-up)")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--max-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train-clients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    from tff_sim import client_data, process, sampling, workers
    from tff_sim.config import SimConfig
    from tff_sim.reaper import reap_worker_binaries

    cfg = SimConfig(preset=args.preset, rounds=args.rounds, clients_per_round=args.clients_per_round,
                    max_examples_per_client=args.max_examples, batch_size=args.batch_size,
                    max_train_clients=args.max_train_clients, seed=args.seed, eval_clients=1, final_eval_max_sentences=10)
    data = client_data.prepare(cfg.dataset, preset_name=args.preset, max_train_clients=args.max_train_clients,
                               eval_clients=1, final_eval_max_sentences=10)
    mc = data.model_config
    started = [start_worker(), start_worker()]
    stack = context_stack_impl.context_stack
    local_ctx = stack.current
    pools = {"1 worker": workers.WorkerPool([started[0][1]]),
             "2 workers": workers.WorkerPool([started[0][1], started[1][1]])}
    contexts = {"local": local_ctx, **{k: p.context for k, p in pools.items()}}
    try:
        for pool in pools.values():
            pool.check_ready()
        learning = process.build_learning_process(cfg, mc)
        w0 = process.initial_weights(mc, args.seed)
        states, times = {}, {m: [] for m in contexts}
        traffic = {m: [] for m in pools}
        cpu = {m: [] for m in pools}
        for mode, ctx in contexts.items():
            stack.set_default_context(ctx)
            states[mode] = process.initialize(learning, w0)
        for r in range(1, args.rounds + 1):
            ids = sampling.sample_clients(data.train_ids, r, args.seed, args.clients_per_round, "uniform")
            order = list(contexts)
            order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first: no order effect
            for mode in order:
                ctx = contexts[mode]
                datasets = [client_data.client_dataset(data.train[c], r, args.seed, 1, args.batch_size, args.max_examples)
                            for c in ids]
                stack.set_default_context(ctx)
                pool = pools.get(mode)
                mark = pool.snapshot() if pool else None
                cpu0 = [cpu_seconds(pid) for _, _, pid in started]
                t0 = time.perf_counter()
                states[mode] = learning.next(states[mode], datasets).state
                times[mode].append(time.perf_counter() - t0)
                if pool:
                    traffic[mode].append([now - then for now, then in zip(pool.snapshot(), mark)])
                    cpu[mode].append([cpu_seconds(pid) - c for (_, _, pid), c in zip(started, cpu0)])
            print(f"round {r}: " + "  ".join(f"{m} {times[m][-1]:.2f} s" for m in contexts), flush=True)
        stack.set_default_context(local_ctx)
        final = {m: process.get_weights_from_state(learning, s) for m, s in states.items()}
    finally:
        stack.set_default_context(local_ctx)
        for pool in pools.values():
            pool.close()
        for proc, _, _ in started:
            proc.terminate()
            proc.wait(30)
        reap_worker_binaries()

    diff = {m: max(float(np.max(np.abs(a - b))) for a, b in zip(final[m], final["local"])) for m in pools}
    med = {m: statistics.median(t[1:]) if len(t) > 1 else t[0] for m, t in times.items()}
    params = mc.num_parameters()
    print(f"\npreset {args.preset} ({params:,} parameters, {4 * params / 1e6:.2f} MB float32), "
          f"{args.clients_per_round} clients x <= {args.max_examples} examples, rounds 2..{args.rounds}, "
          f"{os.cpu_count()} CPUs shared by the driver and the workers")
    result = {"preset": args.preset, "parameters": params, "clients_per_round": args.clients_per_round,
              "max_examples": args.max_examples, "rounds": args.rounds, "cpus": os.cpu_count(),
              "max_abs_weight_diff_vs_local": diff, "modes": {}}
    print(f"{'mode':10s} {'median round':>12s} {'vs local':>9s} {'MB to workers':>14s} {'MB from workers':>16s} "
          f"{'RPCs':>5s} {'worker CPU s/round':>22s} {'max |w - local|':>16s}")
    for mode in contexts:
        row = {"median_round_seconds": med[mode], "round_seconds": times[mode], "ratio_vs_local": med[mode] / med["local"]}
        line = f"{mode:10s} {med[mode]:11.3f}s {med[mode] / med['local']:8.2f}x"
        if mode in pools:
            per_round = traffic[mode][1:] or traffic[mode]
            sent = statistics.median(sum(t.bytes_sent for t in rnd) for rnd in per_round)
            recv = statistics.median(sum(t.bytes_received for t in rnd) for rnd in per_round)
            calls = statistics.median(sum(t.calls for t in rnd) for rnd in per_round)
            kinds: dict[str, list[int]] = {}
            for rnd in per_round:
                merged: dict[str, int] = {}
                for t in rnd:
                    for k, v in t.by_kind.items():
                        merged[k] = merged.get(k, 0) + v
                for k, v in merged.items():
                    kinds.setdefault(k, []).append(v)
            worker_cpu = [statistics.median(c[i] for c in (cpu[mode][1:] or cpu[mode])) for i in range(2)]
            used = worker_cpu if mode == "2 workers" else worker_cpu[:1]
            # time inside gRPC calls, all workers together, over the round time: > 1 when the workers'
            # calls overlapped (they computed at the same time)
            overlap = statistics.median(sum(t.call_seconds for t in rnd) / sec
                                        for rnd, sec in zip(per_round, times[mode][1:] or times[mode]))
            row.update(bytes_to_workers=sent, bytes_from_workers=recv, rpcs=calls, call_time_over_round_time=overlap,
                       bytes_by_kind={k: statistics.median(v) for k, v in sorted(kinds.items())},
                       worker_cpu_seconds=used)
            line += (f" {sent / 1e6:14.2f} {recv / 1e6:16.2f} {calls:5.0f} "
                     f"{' + '.join(f'{c:.2f}' for c in used):>22s} {diff[mode]:16.2e}")
        print(line)
        result["modes"][mode] = row
    for mode in pools:
        kinds = result["modes"][mode]["bytes_by_kind"]
        print(f"  {mode}: time in gRPC calls / round time = {result['modes'][mode]['call_time_over_round_time']:.2f}")
        print(f"  {mode} bytes per round by kind (>= 1 kB): " + ", ".join(
            f"{k} {v / 1e6:.3f} MB" for k, v in kinds.items() if v >= 1000))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = all(d < 1e-4 for d in diff.values())
    print("same weights as local:", "yes" if ok else "NO", f"(max |diff| {max(diff.values()):.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
