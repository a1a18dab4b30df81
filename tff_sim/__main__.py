"""python -m tff_sim [flags]: federated training of the keyboard model in TFF (see --help)."""
from __future__ import annotations

import logging
import os
import sys


def _print_summary(summary: dict) -> None:
    final = summary.get("final", {})
    print(f"\nrun folder: {summary['output']}  ({summary['wall_seconds']:.1f} s)")
    for split, m in final.items():
        print(f"  federated  {split:8s} top-1 {100 * m['top1_recall']:5.2f}%  top-3 {100 * m['top3_recall']:5.2f}%  "
              f"perplexity {m['perplexity']:.1f}")
    for row in summary.get("baselines", []):
        print(f"  {row['model'][:10]:10s} {str(row.get('split', '-')):8s} top-1 {100 * row['top1_recall']:5.2f}%  "
              f"top-3 {100 * row.get('top3_recall', float('nan')):5.2f}%  (baseline)")
    privacy = summary.get("privacy")
    if privacy:
        eps = ", ".join(f"{k} {v:.3g}" for k, v in privacy["final_epsilon"].items())
        print(f"  epsilon at delta {privacy['delta']:.2g}: {eps} (noise multiplier {privacy['noise_multiplier']:.4g})")
        if privacy.get("guarantee"):
            print(f"  {privacy['guarantee']}")
    if summary.get("push"):
        print(f"  push: {summary['push']}")
    print(f"  report: {summary['output']}/report.md   model: {summary['model_path']}")


def main(argv: list[str] | None = None) -> int:
    from models import interrupts

    interrupts.install()  # first: Ctrl-C or SIGTERM in any phase (imports, tracing, rounds, reports) stops the run
    from tff_sim.reaper import exit_after_interrupt, reap_worker_binaries

    try:
        return _run(argv)
    except BaseException as exc:
        code = interrupts.stop_code(exc)
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        exit_after_interrupt(code)
    finally:
        reap_worker_binaries()


def _run(argv: list[str] | None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tff_sim.config import dp_noise_refusal, parse_args

    cfg = parse_args(argv)
    if (refusal := dp_noise_refusal(cfg)) is not None:  # before TensorFlow loads: a refused run costs a second
        print(f"python -m tff_sim: refusing to start: {refusal}", file=sys.stderr, flush=True)
        return 2
    if cfg.workers:  # an unreachable worker is refused before TensorFlow loads
        from tff_sim.workers import reachability_problem

        if (problem := reachability_problem(cfg.workers)) is not None:
            print(f"python -m tff_sim: refusing to start: {problem}", file=sys.stderr, flush=True)
            return 2
    from tff_sim.reaper import install_atexit_reaper

    install_atexit_reaper()
    logging.getLogger("tff_sim").info("phase: loading TensorFlow and TFF")
    from tff_sim.runner import run
    from tff_sim.workers import WorkerError

    try:
        result = run(cfg)
    except WorkerError as exc:  # a worker lost mid-run (checkpoint kept) or a process that cannot be split
        print(f"\npython -m tff_sim: {exc}", file=sys.stderr, flush=True)
        return 3
    _print_summary(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
