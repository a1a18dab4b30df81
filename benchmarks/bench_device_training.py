"""On-device training time per 100 sentences (the work of one federated task or personalization).

    .venv/bin/python benchmarks/bench_device_training.py                  # gboard preset
    .venv/bin/python benchmarks/bench_device_training.py --preset small --runs 5

What is measured: device_app.local_training.LocalTrainer.train (SGD, one epoch, batch 16, the
server's default lr 0.5) on 100 real chitchat sentences of one user at a time (sentences, not
messages: messages are split at sentence ends as the device does), from numpy weights in to
numpy weights out, after one warm-up task that traces the step. Alongside, in the same run:
the delta + clip + noise + wire encode that follow training in a round, and evaluation of the
held-back text (what personalization adds). Several users give the spread.

Baseline in the same run (--keras-baseline, on by default): the straightforward train step,
loss = masked_loss(y, model(x)) over the full [batch, time, vocab] logits, same SGD, same data.
The device trainer composes the same layers but sends only the non-pad positions through the
tied output layer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from device_app.local_training import compute_delta, examples_for, privatize, trainer_for  # noqa: E402
from device_app.testing import vocab_for  # noqa: E402
from models import wire  # noqa: E402
from models.config import preset  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.data.types import seeded_order  # noqa: E402
from models.keras_model import build_model, get_weights  # noqa: E402
from models.tokenizer import split_sentences  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gboard")
    ap.add_argument("--sentences", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5, help="users timed (each its own 100 sentences)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--keras-baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    ds = load_dataset("chitchat")
    size = preset(args.preset).vocab_size - 4
    vocab = vocab_for(ds.all_train_sentences(), size=size)
    config = preset(args.preset, vocab_size=len(vocab))
    weights = get_weights(build_model(config, seed=0))
    trainer = trainer_for(config)
    users = []
    for cid in seeded_order(ds.train_ids, 0, "bench"):
        sentences = [s for m in ds.clients[cid].train for s in split_sentences(m)]
        if len(sentences) >= args.sentences:
            users.append(sentences[: args.sentences])
        if len(users) > args.runs:
            break
    rng = np.random.default_rng(0)
    rows = []
    for i, sentences in enumerate(users):
        x, y = examples_for(sentences, vocab, config.seq_len)
        t0 = time.perf_counter()
        result = trainer.train(weights, x, y, epochs=args.epochs, batch_size=args.batch_size, lr=0.5, seed=i)
        t1 = time.perf_counter()
        private = privatize(compute_delta(result.weights, weights), 1.0, 0.01, rng)
        blob = wire.encode(private.delta, config, kind="delta", model_version=1, metadata={"num_examples": len(x)})
        t2 = time.perf_counter()
        trainer.evaluate(weights, x[:20], y[:20])
        t3 = time.perf_counter()
        if i == 0:
            continue  # warm-up: traces the train and eval steps
        rows.append({"examples": int(len(x)), "tokens": int(np.count_nonzero(y)), "train_s": t1 - t0,
                     "privatize_encode_s": t2 - t1, "eval_20_examples_s": t3 - t2, "upload_bytes": len(blob)})
    baseline = []
    if args.keras_baseline:
        import tensorflow as tf

        from models.keras_model import masked_loss, set_weights

        model, loss_fn = trainer.model, masked_loss()
        spec = tf.TensorSpec([None, config.seq_len], tf.int32)

        @tf.function(input_signature=[spec, spec, tf.TensorSpec([], tf.float32)])
        def keras_step(xb, yb, lr):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            for var, grad in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
                var.assign_sub(lr * tf.convert_to_tensor(grad))
            return loss

        for i, sentences in enumerate(users[:3]):
            x, y = examples_for(sentences, vocab, config.seq_len)
            with trainer.lock:
                set_weights(model, weights)
                t0 = time.perf_counter()
                for b in range(0, len(x), args.batch_size):
                    keras_step(tf.constant(x[b : b + args.batch_size]), tf.constant(y[b : b + args.batch_size]),
                               tf.constant(0.5))
                if i:
                    baseline.append(time.perf_counter() - t0)
    train = [r["train_s"] for r in rows]
    result = {
        "preset": args.preset,
        "parameters": config.num_parameters(),
        "sentences": args.sentences,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "runs": rows,
        "train_s_per_100_sentences_median": statistics.median(train) * 100 / args.sentences,
        "train_s_min": min(train),
        "train_s_max": max(train),
        "privatize_encode_s_median": statistics.median(r["privatize_encode_s"] for r in rows),
        "tracing_counts": trainer.tracing_counts,
        "keras_baseline_train_s": baseline,
        "speedup_vs_keras_baseline": (statistics.median(baseline) / statistics.median(train)) if baseline else None,
    }
    print(f"local training, {args.preset} preset ({config.num_parameters():,} params), {args.sentences} chitchat "
          f"sentences per user, {args.epochs} epoch(s), batch {args.batch_size}, {len(rows)} users")
    for r in rows:
        print(f"  {r['examples']:4d} examples {r['tokens']:5d} tokens: train {r['train_s']:.2f} s, "
              f"delta+clip+noise+encode {r['privatize_encode_s'] * 1e3:.0f} ms, upload {r['upload_bytes'] / 1e6:.1f} MB")
    print(f"  median: {result['train_s_per_100_sentences_median']:.2f} s per 100 sentences per epoch "
          f"(min {min(train):.2f}, max {max(train):.2f}); steps traced {trainer.tracing_counts}")
    if baseline:
        print(f"  baseline Keras step (full logits incl. padding): median {statistics.median(baseline):.2f} s "
              f"-> device trainer {result['speedup_vs_keras_baseline']:.1f}x faster")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
