"""TFF round time vs the identical FedAvg in plain Keras + numpy, in one process.

    .venv/bin/python benchmarks/bench_tff_round_time.py                 # tiny and gboard presets
    .venv/bin/python benchmarks/bench_tff_round_time.py --presets tiny --rounds 6

Both loops train the same model from the same initial weights on the same sampled
chitchat clients, with the same batches in the same order (tff_sim.client_data), client
SGD and server SGD-with-Nesterov-momentum; the script checks that they end at the same
weights, then prints the per-round times and the ratio TFF / plain. Rounds alternate
between the two loops, so a load spike on a shared machine hits both. The first round of
each (tracing, worker start) is reported separately and excluded from the ratio.

It also splits TFF's round time into: building the round's tf.data datasets in Python,
and process.next (serializing state and datasets to the C++ worker over gRPC, running the
client computations there, aggregating, and returning the state), and measures a
TFF round that trains nobody's data (0 batches per client) to expose the fixed per-round
cost that does not depend on the work done.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def bench_preset(name: str, rounds: int, clients_per_round: int, max_examples: int, batch_size: int,
                 max_train_clients: int, seed: int, loop: str = "iterator") -> dict:
    import tensorflow as tf

    from tff_sim import client_data, process, sampling
    from tff_sim.config import SimConfig
    from models import fedavg
    from tff_sim.plain_fedavg import KerasClientTrainer

    cfg = SimConfig(preset=name, rounds=rounds, clients_per_round=clients_per_round, max_examples_per_client=max_examples,
                    batch_size=batch_size, max_train_clients=max_train_clients, client_lr=0.5, server_optimizer="nesterov",
                    server_lr=1.0, seed=seed, eval_clients=1, final_eval_max_sentences=10, tff_loop=loop)
    data = client_data.prepare(cfg.dataset, preset_name=name, max_train_clients=max_train_clients, eval_clients=1,
                               final_eval_max_sentences=10)
    mc = data.model_config
    w0 = process.initial_weights(mc, seed)

    learning = process.build_learning_process(cfg, mc)
    state = process.initialize(learning, w0)
    trainer = KerasClientTrainer(mc, cfg.client_lr)
    server = fedavg.build_server_optimizer(cfg.fedavg)
    plain = fedavg.server_init([w.copy() for w in w0], server)

    tff_times, plain_times, build_times, next_times, batches_per_round = [], [], [], [], []
    for r in range(1, rounds + 1):
        ids = sampling.sample_clients(data.train_ids, r, seed, clients_per_round, "uniform")
        # TFF
        t0 = time.perf_counter()
        datasets = [client_data.client_dataset(data.train[c], r, seed, 1, batch_size, max_examples) for c in ids]
        t1 = time.perf_counter()
        state = learning.next(state, datasets).state
        t2 = time.perf_counter()
        build_times.append(t1 - t0)
        next_times.append(t2 - t1)
        tff_times.append(t2 - t0)
        # plain Keras + numpy
        t0 = time.perf_counter()
        results, counts, nb = [], [], 0
        for c in ids:
            batches = client_data.client_batches(data.train[c], r, seed, 1, batch_size, max_examples)
            nb += len(batches)
            w, n, _ = trainer.train(plain.weights, batches)
            results.append(w)
            counts.append(n)
        plain = fedavg.fedavg_round(plain, results, counts, server)
        plain_times.append(time.perf_counter() - t0)
        batches_per_round.append(nb)
        print(f"  [{name}/{loop}] round {r}: TFF {tff_times[-1]:.3f} s (datasets {build_times[-1]:.3f}, next "
              f"{next_times[-1]:.3f}), plain {plain_times[-1]:.3f} s, {nb} batches", flush=True)

    tff_w = process.get_weights_from_state(learning, state)
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(tff_w, plain.weights))
    max_rel = max_diff / max(float(np.max(np.abs(w))) for w in plain.weights)

    # Fixed cost per round: the same process on empty datasets (no batches to train).
    empty = [tf.data.Dataset.from_tensor_slices((np.zeros((0, mc.seq_len), np.int32),) * 2).batch(batch_size)
             for _ in range(clients_per_round)]
    learning.next(state, empty)
    fixed = []
    for _ in range(3):
        t0 = time.perf_counter()
        learning.next(state, empty)
        fixed.append(time.perf_counter() - t0)

    steady = slice(1, None)
    tff_mean = float(np.mean(tff_times[steady]))
    plain_mean = float(np.mean(plain_times[steady]))
    return {
        "preset": name,
        "loop": loop,
        "parameters": mc.num_parameters(),
        "rounds": rounds,
        "clients_per_round": clients_per_round,
        "batches_per_round": float(np.mean(batches_per_round)),
        "first_round_tff": tff_times[0],
        "first_round_plain": plain_times[0],
        "tff_round": tff_mean,
        "plain_round": plain_mean,
        "ratio": tff_mean / plain_mean,
        "tff_dataset_build": float(np.mean(build_times[steady])),
        "tff_next": float(np.mean(next_times[steady])),
        "tff_fixed_round": float(np.median(fixed)),
        "max_abs_weight_diff": max_diff,
        "max_rel_weight_diff": max_rel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,gboard")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per preset (the first one is warm-up)")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--max-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train-clients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="TFF worker: at most this many client computations at once (default: TFF's, unlimited)")
    parser.add_argument("--loops", default="iterator",
                        help="TFF client loops to time: iterator (tff_sim's default), reduce (TFF's default), or both")
    args = parser.parse_args()

    from models import interrupts
    from tff_sim.reaper import install_atexit_reaper, reap_worker_binaries

    install_atexit_reaper()
    interrupts.install()  # Ctrl-C / SIGTERM: the `finally` below reaps TFF's worker
    if args.max_concurrent:
        import tensorflow_federated as tff

        tff.backends.native.set_sync_local_cpp_execution_context(max_concurrent_computation_calls=args.max_concurrent)
    results = []
    try:
        for name in args.presets.split(","):
            for loop in args.loops.split(","):
                results.append(bench_preset(name.strip(), args.rounds, args.clients_per_round, args.max_examples,
                                            args.batch_size, args.max_train_clients, args.seed, loop.strip()))
    finally:
        reap_worker_binaries()

    print("\nTFF round time vs plain Keras/numpy FedAvg (same clients, batches, model, optimizers; steady-state rounds)")
    print(f"{'preset':8s} {'loop':8s} {'params':>9s} {'batches':>7s} {'TFF s':>8s} {'plain s':>8s} {'ratio':>6s} "
          f"{'datasets s':>10s} {'next s':>8s} {'fixed s':>8s} {'max |dw|':>9s}")
    for r in results:
        print(f"{r['preset']:8s} {r['loop']:8s} {r['parameters']:9,d} {r['batches_per_round']:7.1f} {r['tff_round']:8.3f} "
              f"{r['plain_round']:8.3f} {r['ratio']:6.2f} {r['tff_dataset_build']:10.3f} {r['tff_next']:8.3f} "
              f"{r['tff_fixed_round']:8.3f} {r['max_abs_weight_diff']:9.2e}")
    print("ratio = TFF / plain (target <= 1.3). fixed = a TFF round on empty client datasets: the per-round cost that "
          "does not depend on training (state and dataset transfer to the worker_binary, executor orchestration).")


if __name__ == "__main__":
    main()
