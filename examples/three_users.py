"""Federated averaging by hand, then through TFF: three users, bob, alice and sue.

Each round every user trains a copy of the global model on their own messages (three real
chitchat users), the server averages the three models (weighted by how many examples each
trained on: FedAvg), and the test recall of the average is printed. Part 1 is plain Keras
and numpy (models/fedavg.py: deltas trained - global, their weighted mean, a server SGD step
with lr 1, which is exactly the weighted average of the models); part 2 does the same with TensorFlow Federated, and at the end the two final
models are compared: they are the same model up to float rounding.

    .venv/bin/python examples/three_users.py            # ~1 minute on 2 cores
    .venv/bin/python examples/three_users.py --rounds 10 --preset small
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

USERS = ("bob", "alice", "sue")


def load_users(preset_name: str, max_examples: int):
    """Three real users (the chitchat training clients with the most messages), a vocabulary, test sentences."""
    from models.config import preset
    from models.data import load_dataset
    from models.examples import make_examples
    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary

    ds = load_dataset("chitchat")
    chosen = sorted(ds.train_ids, key=lambda cid: (-len(ds.clients[cid].train), cid))[:3]
    tokens = {name: [t for m in ds.clients[cid].train for t in tokenize_sentences(m)] for name, cid in zip(USERS, chosen)}
    test = [t for cid in chosen for m in ds.clients[cid].test for t in tokenize_sentences(m)][:3000]
    vocab = Vocabulary.build([s for sents in tokens.values() for s in sents], size=preset(preset_name).vocab_size - 4)
    config = preset(preset_name, vocab_size=len(vocab))
    slices = {}
    for name in USERS:
        x, y = make_examples(tokens[name], vocab, config.seq_len)
        slices[name] = (x[-max_examples:], y[-max_examples:])  # each user's most recent messages
    return config, vocab, slices, test


def recall(config, vocab, weights, test) -> str:
    from models.central import evaluate_keras

    m = evaluate_keras(config, weights, test, vocab)
    return f"top-1 {100 * m['top1_recall']:5.2f}%  top-3 {100 * m['top3_recall']:5.2f}%"


def plain_keras(config, vocab, slices, test, rounds, lr, batch_size, seed):
    """Part 1: the loop by hand."""
    import tensorflow as tf

    from models import fedavg
    from models.keras_model import build_model, get_weights, masked_loss, set_weights

    model = build_model(config)
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=lr), loss=masked_loss())
    server = fedavg.ServerOptimizer("sgd", lr=1.0)  # server SGD with lr 1: the new model is the weighted average
    state = fedavg.server_init(get_weights(build_model(config, seed=seed)), server)
    global_weights = state.weights
    print(f"round  0 (start)                 {recall(config, vocab, global_weights, test)}")
    for rnd in range(1, rounds + 1):
        local, sizes = {}, {}
        for name in USERS:  # each user trains a copy of the global model on their own slice
            set_weights(model, global_weights)
            x, y = slices[name]
            model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            local[name], sizes[name] = get_weights(model), len(x)
        # the server averages the three updates (trained - global), weighted by examples, and takes the step
        deltas = [fedavg.client_delta(local[n], global_weights) for n in USERS]
        state = fedavg.server_update(state, fedavg.weighted_mean(deltas, [sizes[n] for n in USERS]), server)
        global_weights = state.weights
        print(f"round {rnd:2d} (bob, alice, sue)      {recall(config, vocab, global_weights, test)}")
    return global_weights


def with_tff(config, vocab, slices, test, rounds, lr, batch_size, seed):
    """Part 2: the same round as a TFF federated computation (weighted FedAvg, server SGD lr 1 = averaging)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from models.fedavg import FedAvgHyperparams
    from tff_sim import process

    learning = tff.learning.algorithms.build_weighted_fed_avg(
        process.make_model_fn(config),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(lr),
        server_optimizer_fn=process.tff_server_optimizer(FedAvgHyperparams(server_optimizer="sgd", server_lr=1.0)),
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )
    state = process.initialize(learning, process.initial_weights(config, seed))
    datasets = [tf.data.Dataset.from_tensor_slices(slices[name]).batch(batch_size) for name in USERS]
    for rnd in range(1, rounds + 1):
        state = learning.next(state, datasets).state
        weights = process.get_weights_from_state(learning, state)
        print(f"round {rnd:2d} (TFF: bob, alice, sue) {recall(config, vocab, weights, test)}")
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lr", type=float, default=1.0, help="client SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-examples", type=int, default=600, help="per user (their most recent)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from models import interrupts
    from tff_sim.reaper import install_atexit_reaper, reap_worker_binaries

    install_atexit_reaper()
    interrupts.install()  # Ctrl-C / SIGTERM: the `finally` below reaps TFF's worker
    config, vocab, slices, test = load_users(args.preset, args.max_examples)
    print(f"users: " + ", ".join(f"{n} ({len(slices[n][0])} examples)" for n in USERS)
          + f"; vocabulary {len(vocab)}; test: {len(test)} sentences of the three users' later messages\n")
    print("1. plain Keras, averaging with numpy")
    by_hand = plain_keras(config, vocab, slices, test, args.rounds, args.lr, args.batch_size, args.seed)
    print("\n2. the same with TensorFlow Federated")
    try:
        federated = with_tff(config, vocab, slices, test, args.rounds, args.lr, args.batch_size, args.seed)
    finally:
        reap_worker_binaries()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(by_hand, federated))
    print(f"\nlargest difference between the two final models' weights: {diff:.2e}")


if __name__ == "__main__":
    main()
