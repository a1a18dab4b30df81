"""Suggestion quality in one table: every model against the KN 5-gram trained in the same run.

    .venv/bin/python benchmarks/bench_quality.py                         # the default artifacts
    .venv/bin/python benchmarks/bench_quality.py --federated RUN/model --demo-model models/default \\
        --personal-users 40 --out artifacts/bench/quality.json

Every neural model is a bundle (config + vocabulary + weights): the federated CIFG without DP
(default: the best run of the chitchat-small sweep, by its own held-out top-1), the converged
server-trained CIFG of `models.baselines --preset small`, and the model the demo ends with. All are
scored on the same held-out users' sentences (all text of the users no model trained on, the seeded
sample `models.baselines` scores), and each against a Kneser-Ney 5-gram trained here, in this run,
on the training users' text with that bundle's vocabulary, so every ratio compares like with like.
`--pretrain-population` names the text the demo's pre-training may use; the demo's model is also
compared with a KN 5-gram built from that text only.

`--personal-users N` adds the personal-suggestions row (benchmarks/bench_personal.py's replay of N
held-out users: the global model vs + cache + fine-tuning).

Goals (the quality issue): federated / KN >= 1.03 and federated / server-trained >= 0.97; demo's
model / KN(pre-training text) >= 1.0; personal: median per-user gain >= +2 points, no user worse
by more than 0.5 points. Prints the table and the goals, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SWEEP = "artifacts/sweep/chitchat-small"
DEFAULT_SERVER_TRAINED = "artifacts/baselines-small/server_trained"
GOALS = {"federated_vs_kn": 1.03, "federated_vs_server": 0.97, "demo_vs_kn_pretrain": 1.0,
         "personal_median_gain": 2.0, "personal_worst_gain": -0.5}


def best_sweep_run(sweep_dir: str | Path) -> Path | None:
    """The model folder of the sweep run with the best final held-out top-1 (None: no finished run)."""
    best: tuple[float, Path] | None = None
    for summary in sorted(Path(sweep_dir).glob("*/summary.json")):
        s = json.loads(summary.read_text())
        top1 = s.get("final", {}).get("heldout", {}).get("top1_recall")
        model = summary.parent / "model"
        if top1 is not None and model.is_dir() and (best is None or top1 > best[0]):
            best = (top1, model)
    return None if best is None else best[1]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def same_targets(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two rows' top-1 are fractions of the same target words, so their ratio is fair.

    Top-1 counts every real target word, an out-of-vocabulary one as a miss (models.metrics), so two
    bundles scored on the same sentences compare even when their vocabularies differ: the smaller
    vocabulary's misses on the words it lacks count against it.
    """
    return a is not None and b is not None and a["tokens"] == b["tokens"]


def verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value >= goal else "NOT met"


class Scorer:
    """Scores bundles and KN 5-grams on one held-out sample; one KN per (vocabulary, population)."""

    def __init__(self, dataset: str, seed: int, max_eval_sentences: int | None) -> None:
        from models.central import sample_sentences, token_lists
        from models.data import load_dataset

        self.ds = load_dataset(dataset, seed=seed)
        ds = self.ds
        heldout = token_lists(t for cid in ds.heldout_ids for t in [*ds.clients[cid].train, *ds.clients[cid].test])
        self.heldout = sample_sentences(heldout, max_eval_sentences, seed + 1)
        self._train: dict[str, list[list[str]]] = {}
        self._kn: dict[tuple[str, str], dict[str, float]] = {}

    def train_text(self, population: str) -> list[list[str]]:
        from models.central import token_lists

        if population not in self._train:
            ds = self.ds
            self._train[population] = token_lists(t for cid in self.ds.population_ids(population)
                                                  for t in ds.clients[cid].train)
        return self._train[population]

    def kn(self, vocab: Any, population: str) -> dict[str, float]:
        """Held-out metrics of a KN 5-gram trained here on `population`'s text with `vocab`."""
        from models.ngram import NgramModel

        key = (vocab.content_hash(), population)
        if key not in self._kn:
            t = time.time()
            model = NgramModel.train(self.train_text(population), vocab, order=5)
            self._kn[key] = {**model.evaluate(self.heldout), "train_seconds": round(time.time() - t, 1)}
        return self._kn[key]

    def bundle(self, bundle: Any) -> dict[str, float]:
        from models.central import evaluate_keras

        return evaluate_keras(bundle.config, bundle.weights, self.heldout, bundle.vocab)


def personal_row(bundle_path: Path, users: int, dataset: str, seed: int) -> dict[str, Any]:
    """bench_personal's summary for `users` held-out users (its replay, its selection rule)."""
    import bench_personal

    out = ROOT / "artifacts" / "bench" / "personal-from-quality.json"
    bench_personal.main(["--bundle", str(bundle_path), "--dataset", dataset, "--users", str(users),
                         "--seed", str(seed), "--fixed-weights", "", "--out", str(out)])
    return json.loads(out.read_text())["summary"]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'model':<34} {'top-1':>7} {'top-3':>7} {'ppl':>7} {'x KN':>6} {'KN top-1':>9}  KN trained on",
             "-" * 100]
    for r in rows:
        x = f"{r['x_kn']:.3f}" if r.get("x_kn") is not None else "-"
        lines.append(f"{r['model']:<34} {100 * r['top1']:>7.2f} {100 * r['top3']:>7.2f} {r['perplexity']:>7.1f} "
                     f"{x:>6} {100 * r['kn_top1']:>9.2f}  {r['kn_population']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federated", default=None, help=f"bundle of the federated model (default: best run of {DEFAULT_SWEEP})")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="the sweep folder --federated defaults from")
    ap.add_argument("--server-trained", default=DEFAULT_SERVER_TRAINED, help="bundle of the converged server-trained model")
    ap.add_argument("--demo-model", default=None, help="bundle of the model the demo ends with")
    ap.add_argument("--pretrain-population", default="all", choices=("all", "donors"),
                    help="the text the demo's pre-training may use (its KN reference is built from it)")
    ap.add_argument("--personal-users", type=int, default=0, help="also replay this many held-out users (0: skip)")
    ap.add_argument("--personal-bundle", default=None, help="global model of the personal row (default: --demo-model, "
                                                            "else --server-trained)")
    ap.add_argument("--dataset", default="chitchat")
    ap.add_argument("--max-eval-sentences", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="artifacts/bench/quality.json")
    args = ap.parse_args(argv)

    from models.bundle import load_bundle

    started = time.time()
    federated = Path(args.federated) if args.federated else best_sweep_run(args.sweep)
    bundles = {"federated CIFG (no DP)": federated, "server-trained CIFG (converged)": Path(args.server_trained),
               "demo's final model": Path(args.demo_model) if args.demo_model else None}
    scorer = Scorer(args.dataset, args.seed, args.max_eval_sentences)
    print(f"{args.dataset}: {len(scorer.ds.train_ids)} training users, {len(scorer.ds.heldout_ids)} held-out users; "
          f"{len(scorer.heldout):,} held-out sentences scored", flush=True)
    rows: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    for name, path in bundles.items():
        if path is None or not path.is_dir():
            missing[name] = f"no bundle at {path}" if path else "not given"
            continue
        bundle = load_bundle(path)
        population = args.pretrain_population if name == "demo's final model" else "all"
        m, kn = scorer.bundle(bundle), scorer.kn(bundle.vocab, population)
        rows.append({"model": name, "bundle": str(path), "top1": m["top1_recall"], "top3": m["top3_recall"],
                     "perplexity": m["perplexity"], "tokens": m["tokens"], "kn_top1": kn["top1_recall"],
                     "kn_top3": kn["top3_recall"], "kn_population": population,
                     "x_kn": ratio(m["top1_recall"], kn["top1_recall"]),
                     "vocab_hash": bundle.vocab.content_hash(), "source": bundle.meta.get("source")})
        print(f"scored {name} ({path})", flush=True)
    by_name = {r["model"]: r for r in rows}
    fed, srv, demo = (by_name.get(k) for k in bundles)
    goals = {
        "federated_vs_kn": fed and fed["x_kn"],
        "federated_vs_server": ratio(fed["top1"], srv["top1"]) if same_targets(fed, srv) else None,
        "demo_vs_kn_pretrain": demo and demo["x_kn"],
    }
    personal = None
    if args.personal_users > 0:
        pb = args.personal_bundle or args.demo_model or args.server_trained
        personal = personal_row(Path(pb), args.personal_users, args.dataset, args.seed)
        goals["personal_median_gain"] = personal["both"]["median_gain_points"]
        goals["personal_worst_gain"] = personal["both"]["worst_gain_points"]

    print(f"\nHeld-out next-word quality ({args.dataset}), %   [{time.time() - started:.0f} s]")
    print(format_table(rows))
    for name, why in missing.items():
        print(f"{name:<34} {why}")
    if personal is not None:
        both = personal["both"]
        print(f"\npersonal (cache + fine-tuning), {args.personal_users} held-out users: pooled top-1 "
              f"{100 * personal['global']['pooled_top1']:.2f} -> {100 * both['pooled_top1']:.2f}, median gain "
              f"{both['median_gain_points']:+.2f} points, worst {both['worst_gain_points']:+.2f}")
    print("\ngoal                                   measured    target  verdict")
    for key, value in goals.items():
        shown = f"{value:.3f}" if value is not None else "-"
        print(f"{key:<38} {shown:>8} {GOALS[key]:>9}  {verdict(value, GOALS[key])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": vars(args), "heldout_sentences": len(scorer.heldout), "rows": rows, "missing": missing,
              "personal": personal, "goals": {k: {"measured": v, "target": GOALS[k], "verdict": verdict(v, GOALS[k])}
                                              for k, v in goals.items()},
              "seconds": round(time.time() - started, 1)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
