"""Quality of federated training on chitchat vs the n-gram and server-trained baselines.

    .venv/bin/python -m models.baselines                       # once: artifacts/baselines/results.json
    .venv/bin/python benchmarks/bench_tff_quality.py           # FedAvg, then DP-FedAvg at epsilon <= 10
    .venv/bin/python benchmarks/bench_tff_quality.py --rounds 300 --clients-per-round 50   # closer to Gboard

Both runs use the gboard preset with the baselines' vocabulary (the top 10,000 words of the
training clients' train split) and are evaluated on the very sentences the baselines are
evaluated on (the same seeded sample of each split), so the rows of the table compare
directly. The DP run calibrates its noise multiplier so that epsilon (RDP, delta =
1/population^1.1) after its rounds is the target, and reports RDP and PLD epsilon.
Gboard (Hard et al. 2018) reports federated 16.4 / 27.0 vs server-trained 16.5 / 27.1
top-1 / top-3 recall on its own logs. Writes one run folder per run under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GBOARD = {"federated": (0.164, 0.270), "server-trained": (0.165, 0.271)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gboard")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--max-examples-per-client", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--client-lr", type=float, default=0.5)
    parser.add_argument("--server-optimizer", default="nesterov")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--dp-rounds", type=int, default=None, help="default: --rounds")
    parser.add_argument("--dp-clients-per-round", type=int, default=None, help="default: --clients-per-round")
    parser.add_argument("--target-epsilon", type=float, default=10.0)
    parser.add_argument("--clip", type=float, default=0.5, help="DP clip (initial clip with --adaptive-clip)")
    parser.add_argument("--adaptive-clip", action="store_true")
    parser.add_argument("--dp-server-optimizer", default=None, help="default: --server-optimizer")
    parser.add_argument("--dp-server-lr", type=float, default=None, help="default: --server-lr")
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--skip-fedavg", action="store_true")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--baselines", default="artifacts/baselines/results.json")
    parser.add_argument("--out", default="runs/bench_quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from models import interrupts
    from tff_sim.reaper import install_atexit_reaper, reap_worker_binaries

    install_atexit_reaper()
    interrupts.install()  # Ctrl-C / SIGTERM: the `finally` below reaps TFF's worker
    from tff_sim import report
    from tff_sim.config import SimConfig
    from tff_sim.runner import load_data, run

    common = dict(preset=args.preset, max_examples_per_client=args.max_examples_per_client, batch_size=args.batch_size,
                  client_lr=args.client_lr, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                  eval_every=args.eval_every, seed=args.seed, baselines=args.baselines, progress=sys.stderr.isatty())
    fedavg_cfg = SimConfig(**common, rounds=args.rounds, clients_per_round=args.clients_per_round,
                           output=f"{args.out}/fedavg")
    dp_common = {**common, "server_optimizer": args.dp_server_optimizer or args.server_optimizer,
                 "server_lr": args.dp_server_lr or args.server_lr}
    dp_cfg = SimConfig(**dp_common, rounds=args.dp_rounds or args.rounds,
                       clients_per_round=args.dp_clients_per_round or args.clients_per_round, dp=True,
                       target_epsilon=args.target_epsilon, clip=args.clip, adaptive_clip=args.adaptive_clip,
                       output=f"{args.out}/dp")
    started = time.time()
    data = load_data(fedavg_cfg)
    baselines = report.load_baselines(args.baselines)
    base_meta = {}
    if Path(args.baselines).is_file():
        base_meta = json.loads(Path(args.baselines).read_text()).get("config", {})
    same_vocab = base_meta.get("vocab_hash") == data.vocab.content_hash()
    print(f"data: {data.summary()}")
    print(f"baselines: {args.baselines} ({'same vocabulary' if same_vocab else 'DIFFERENT vocabulary: rows not comparable'};"
          f" preset {base_meta.get('preset', '?')}, server-trained on {base_meta.get('max_sentences', '?')} sentences)")

    results = {}
    try:
        if not args.skip_fedavg:
            results["federated (FedAvg)"] = run(fedavg_cfg, data).summary
        if not args.skip_dp:
            results["federated DP-FedAvg"] = run(dp_cfg, data).summary
    finally:
        reap_worker_binaries()

    print(f"\nQuality on chitchat ({args.preset} preset), top-1 / top-3 recall of the next word, %  "
          f"[{time.time() - started:.0f} s]")
    print(f"{'model':34s} {'split':8s} {'top-1':>6s} {'top-3':>6s} {'ppl':>7s}  notes")
    for name, summary in results.items():
        cfg = summary["config"]
        note = (f"{summary['rounds_done']} rounds x {cfg['clients_per_round']} clients, server "
                f"{cfg['server_optimizer']} lr {cfg['server_lr']}, {summary['mean_round_seconds']:.1f} s/round")
        if "privacy" in summary:
            p = summary["privacy"]
            eps = ", ".join(f"{k} {v:.2f}" for k, v in p["final_epsilon"].items())
            clip = "adaptive from " if cfg["adaptive_clip"] else ""
            note += (f"; clip {clip}{cfg['clip']}, z={p['noise_multiplier']:.3g}, q={p['sampling_prob']:.3g}, "
                     f"eps {eps} at delta {p['delta']:.2g}")
        for split, m in summary["final"].items():
            print(f"{name:34s} {split:8s} {100 * m['top1_recall']:6.2f} {100 * m['top3_recall']:6.2f} "
                  f"{m['perplexity']:7.1f}  {note}")
    for row in baselines:
        if row["model"] == "unigram":
            continue
        print(f"{row['model'] + ' (baseline)':34s} {row['split']:8s} {100 * row['top1_recall']:6.2f} "
              f"{100 * row['top3_recall']:6.2f} {row.get('perplexity') or float('nan'):7.1f}")
    for name, (t1, t3) in GBOARD.items():
        print(f"{'Gboard paper, ' + name:34s} {'logs':8s} {100 * t1:6.2f} {100 * t3:6.2f}")


if __name__ == "__main__":
    main()
