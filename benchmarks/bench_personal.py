"""Personal suggestions on held-out users: global vs +cache vs +fine-tuning vs both.

    .venv/bin/python benchmarks/bench_personal.py --bundle artifacts/baselines-small/server_trained
    .venv/bin/python benchmarks/bench_personal.py --bundle B --users 30 --out artifacts/bench/personal.json
    .venv/bin/python benchmarks/bench_personal.py --bundle models/pretrained/small --oracle   # + the ceilings

Each held-out chitchat user (never trained on by the global model) is replayed as a device:
their oldest `--past` share of messages is what the device holds (split as the device's store
splits it: the latest 20% held back, the rest trained on), the messages after that are the
future the user types, on which every variant is scored (top-1/top-3 recall, per user):

* global: the global model alone.
* +cache: the global model blended with the personal n-gram cache (models/personal_cache.py).
  The blend weight is chosen on the held-back messages with a cache of the training messages;
  then the cache holds all past messages and grows with each future sentence once it is typed.
* +fine-tuning: the device's personal model (SGD on the training messages with the device's
  PersonalizationSettings) where the device would serve it, else the global model.
* both: the cache blended with whichever model is served.
* finetune-all: the fine-tuned model served to every user, proven on held-back text or not.
* cache@w: the global model + cache at a fixed weight w (--fixed-weights): what a device serves
  before a weight was chosen for its user (the evidence for models.personal_cache.DEFAULT_WEIGHT).
Which model is served and each cache weight come from the device's own selection rule,
models.personal_cache.select_personal (the fine-tuned model only when it beats the global model
on >= MIN_GAIN_TOKENS held-back words; weights chosen on the held-back text).

Goals (the quality issue): median per-user top-1 gain of `both` over `global` >= +2 points and
no user worse by more than 0.5 points. Prints the table and writes the per-user rows as JSON.

--kappa K scores the context-dependent cache weight (models.personal_cache.NgramCache kappa):
every cache, the one the weight is chosen with included, is built with it.

How far any weight rule can go (--oracle: the weight, and the model, best on each user's own *future*
text; 58 users, the README has the table): median top-1 gains of +1.10 / +1.54 points (cache / model and
cache) on models/pretrained/small, +0.69 / +1.90 on the federated recipe's model (the cache-only oracle on
the small model was about the same with kappa 2 or without the unigram back-off). An oracle that picks per word between the global
model's and the cache's first suggestion gives +4.6 (small model), but the simple features of the context
(count and length of the longest history seen, the cache's share for its first word) pick out too few of
those words: switching to the cache's first word wherever that wins on these very users would add ~0.7
points pooled. Most users type ~100-400 future words, so a single word is 0.25-1 point: "no user worse by
more than 0.5 points" is, for the smaller users, "no word lost". --ft-epochs / --ft-lr override the device's
fine-tuning settings (models' ceilings at other settings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = ("global", "cache", "finetune", "both", "finetune-all")
# --oracle: what a perfect choice on the user's own *future* text could reach (not deployable: the ceiling
# of the weight rule): the best grid weight on the global model, and the best of either model at any weight.
ORACLE_VARIANTS = ("cache-oracle", "both-oracle")


def global_logprobs(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """log_softmax of the Keras model's logits for windows x: [n, T, V] float32."""
    import tensorflow as tf

    out = [tf.nn.log_softmax(model(x[s : s + batch], training=False)).numpy() for s in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, x.shape[1], 0), np.float32)


def fixed_name(weight: float) -> str:
    return f"cache@{weight:g}"


def replay_user(messages: list[str], past: float, bundle: Any, model: Any, trainer: Any, settings: Any,
                seed: int, fixed_weights: tuple[float, ...] = (), kappa: float = 0.0,
                oracle: bool = False) -> dict[str, Any] | None:
    """One user's row: the variants' metrics on their future messages (and the oracles' with `oracle`)."""
    from device_app.local_training import examples_for
    from device_app.store import TextStore
    from models.keras_model import set_weights
    from models.personal_cache import WEIGHT_GRID, cache_from_windows, evaluate_blend, select_personal

    config, vocab = bundle.config, bundle.vocab
    n_past = int(round(past * len(messages)))
    with tempfile.TemporaryDirectory() as tmp:  # the device's own store decides what it holds back
        store = TextStore(Path(tmp) / "text.db")
        for m in messages[:n_past]:
            store.add(m)
        split = store.split()
        store.close()
    train_msgs, held_msgs, future = split.train, split.heldout, messages[n_past:]
    x, y = examples_for(train_msgs, vocab, config.seq_len)
    hx, hy = examples_for(held_msgs, vocab, config.seq_len)
    fx, fy = examples_for(future, vocab, config.seq_len)
    if len(x) == 0 or len(hx) == 0 or len(fx) == 0:
        return None

    set_weights(model, bundle.weights, config)
    g_held, g_future = global_logprobs(model, hx), global_logprobs(model, fx)
    tuned = trainer.train(bundle.weights, x, y, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                          seed=seed)
    set_weights(model, tuned.weights, config)
    t_held, t_future = global_logprobs(model, hx), global_logprobs(model, fx)
    vocab_size = len(vocab)

    def cache_of(cx: np.ndarray, cy: np.ndarray) -> Any:
        return cache_from_windows(cx, cy, vocab_size, kappa=kappa)

    # The device's selection rule (models/personal_cache.py), on the held-back messages with a cache
    # of the training messages: which model is served, and each model's cache weight.
    sel = select_personal(hx, hy, g_held, t_held, cache_of(x, y),
                          min_tokens=settings.min_heldout_tokens, min_weight_tokens=settings.min_weight_tokens)
    w_cache, w_both = sel.weight_global, sel.weight
    past_x, past_y = np.concatenate([x, hx]), np.concatenate([y, hy])
    row: dict[str, Any] = {"messages": len(messages), "train_messages": len(train_msgs), "heldout_messages": len(held_msgs),
                           "future_messages": len(future), "heldout_tokens": sel.heldout_tokens,
                           "enough_text": sel.enough_text, "serve_finetuned": sel.served == "personal",
                           "weight_cache": w_cache, "weight_both": w_both}
    # One pass per model over the future text, every weight at once (each pass needs its own growing cache).
    on_global = evaluate_blend(fx, fy, g_future, cache_of(past_x, past_y),
                               sorted({0.0, w_cache, w_both, *fixed_weights, *(WEIGHT_GRID if oracle else ())}))
    on_tuned = evaluate_blend(fx, fy, t_future, cache_of(past_x, past_y),
                              sorted({0.0, w_both, *(WEIGHT_GRID if oracle else ())}))
    served = on_tuned if sel.served == "personal" else on_global
    scored = {
        "global": on_global.metrics_of(0.0),
        "cache": on_global.metrics_of(w_cache),
        "finetune": served.metrics_of(0.0),
        "both": served.metrics_of(w_both),
        "finetune-all": on_tuned.metrics_of(0.0),
    }
    # Fixed weights on the global model (what a device serves before any weight was chosen for it).
    for w in fixed_weights:
        scored[fixed_name(w)] = on_global.metrics_of(w)
    if oracle:
        scored["cache-oracle"] = best_top1(on_global.metrics)
        scored["both-oracle"] = best_top1([*on_global.metrics, *on_tuned.metrics])
    for name, m in scored.items():
        row[f"{name}_top1"], row[f"{name}_top3"] = m["top1_recall"], m["top3_recall"]
    row["tokens"] = int(scored["global"]["tokens"])
    return row


def best_top1(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The metrics with the highest top-1 (the first of a tie: the lowest weight, the global model)."""
    return max(metrics, key=lambda m: m["top1_recall"])


def summarize(rows: list[dict[str, Any]], variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    out: dict[str, Any] = {"users": len(rows), "users_serving_finetuned": sum(r["serve_finetuned"] for r in rows),
                           "users_with_enough_heldout_text": sum(r["enough_text"] for r in rows),
                           "median_heldout_tokens": statistics.median(r["heldout_tokens"] for r in rows)}
    tokens = sum(r["tokens"] for r in rows)
    for v in variants:
        gains = [100 * (r[f"{v}_top1"] - r["global_top1"]) for r in rows]
        out[v] = {
            "pooled_top1": sum(r[f"{v}_top1"] * r["tokens"] for r in rows) / tokens,
            "pooled_top3": sum(r[f"{v}_top3"] * r["tokens"] for r in rows) / tokens,
            "median_gain_points": statistics.median(gains),
            "worst_gain_points": min(gains),
            "users_worse_by_0_5": sum(g < -0.5 for g in gains),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="artifacts/baselines-small/server_trained", help="the global model bundle")
    ap.add_argument("--dataset", default="chitchat")
    ap.add_argument("--users", type=int, default=0, help="at most this many held-out users (0: all)")
    ap.add_argument("--min-messages", type=int, default=20, help="skip users with fewer messages")
    ap.add_argument("--past", type=float, default=0.7, help="share of a user's messages already on the device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed-weights", default="0.05,0.1,0.2,0.3",
                    help="also score the global model + cache at these fixed weights (the default weight's evidence)")
    ap.add_argument("--kappa", type=float, default=0.0,
                    help="context-dependent cache weight: lam * c(h) / (c(h) + kappa) (0: one weight per user)")
    ap.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs (default: the device's setting)")
    ap.add_argument("--ft-lr", type=float, default=None, help="fine-tuning learning rate (default: the device's)")
    ap.add_argument("--oracle", action="store_true",
                    help="also score the ceilings: the weight (and model) best on each user's own future text")
    ap.add_argument("--out", default="artifacts/bench/personal.json")
    args = ap.parse_args(argv)
    fixed_weights = tuple(float(w) for w in args.fixed_weights.split(",") if w.strip())
    variants = (*VARIANTS, *(fixed_name(w) for w in fixed_weights), *(ORACLE_VARIANTS if args.oracle else ()))

    from device_app.local_training import trainer_for
    from device_app.personalize import PersonalizationSettings
    from models import interrupts
    from models.bundle import load_bundle
    from models.data import load_dataset
    from models.keras_model import build_model
    from models.personal_cache import MIN_GAIN_TOKENS

    interrupts.install()
    bundle = load_bundle(args.bundle)
    ds = load_dataset(args.dataset, seed=0)
    users = [c for c in ds.heldout_ids if len(ds.clients[c]) >= args.min_messages]
    if args.users:
        users = users[: args.users]
    default = PersonalizationSettings()
    settings = dataclasses.replace(default, epochs=args.ft_epochs or default.epochs, lr=args.ft_lr or default.lr)
    model, trainer = build_model(bundle.config), trainer_for(bundle.config)
    rows, started = [], time.time()
    for i, cid in enumerate(users, 1):
        c = ds.clients[cid]
        row = replay_user([*c.train, *c.test], args.past, bundle, model, trainer, settings, args.seed + i,
                          fixed_weights, args.kappa, args.oracle)
        if row is not None:
            rows.append({"user": cid, **row})
            print(f"[{i}/{len(users)}] {cid}: global {row['global_top1']:.1%} cache {row['cache_top1']:.1%} "
                  f"finetune {row['finetune_top1']:.1%} both {row['both_top1']:.1%} (w {row['weight_both']})", flush=True)
    summary = summarize(rows, variants)
    print(f"\n{'variant':<12} {'top-1':>7} {'top-3':>7} {'median gain':>12} {'worst':>7} {'users < -0.5':>13}")
    for v in variants:
        s = summary[v]
        print(f"{v:<12} {s['pooled_top1']:>7.2%} {s['pooled_top3']:>7.2%} {s['median_gain_points']:>+11.2f}p "
              f"{s['worst_gain_points']:>+6.2f}p {s['users_worse_by_0_5']:>13}")
    print(f"fine-tuned model served to {summary['users_serving_finetuned']} of {len(rows)} users "
          f"({summary['users_with_enough_heldout_text']} had >= {MIN_GAIN_TOKENS} held-back words; "
          f"median {summary['median_heldout_tokens']:.0f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"bundle": str(args.bundle), "bundle_meta": {k: bundle.meta.get(k) for k in ("source", "dataset")},
              "args": vars(args), "settings": settings.to_dict(), "summary": summary, "rows": rows,
              "seconds": round(time.time() - started, 1)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{len(rows)} users in {report['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
