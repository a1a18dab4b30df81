"""Canary exposure test (Carlini et al. 2019, "The Secret Sharer"): does federated training memorize a
secret one user typed, and does DP-FedAvg stop it?

    python -m tff_sim.canary                                   # defaults: small model, 50 chitchat users
    python -m tff_sim.canary --preset tiny --clients 30 --rounds 20 --output runs/canary-tiny

A random canary sentence "my pin number is D D D D" (D random digits of the vocabulary; the format has
|R| = 10^4 candidates) is inserted `copies` times into one simulated user's training messages. The
same federation is trained twice from the same initial weights with the same cohorts: once without DP
(plain FedAvg, example-weighted) and once with DP, by `--mechanism`:

  dp-fedavg  Poisson cohorts (q = clients_per_round / clients); each update clipped to L2 norm `clip`,
             Gaussian noise z * clip on the sum, fixed denominator q * N (Andrew/McMahan et al.);
             epsilon of the subsampled Gaussian (models.dp, RDP).
  dp-ftrl    no sampling: each epoch shuffles the users into rounds of clients_per_round (every user at
             most once per epoch, the server's "restart" participation rule); clipped updates summed
             with DP-FTRL's tree noise (models.dp_ftrl, trees restarted every epoch, Kairouz et al. 2021);
             epsilon of the tree-aggregation mechanism (models.dp.ftrl_epsilon, RDP).

Exposure. Every candidate c of the format gets its log-perplexity under the trained model,
-sum log p(token | prefix) over the secret tokens (the shared prefix adds the same to all). The
canary's rank is 1 + the number of candidates with a strictly lower log-perplexity, and

    exposure = log2 |R| - log2 rank        (0: the canary looks like any random candidate;
                                            log2 |R| = 13.3: it is the model's top guess)

All 10^4 candidates are scored exactly with one batch of the 10^3 three-digit prefixes (the logits at
each position give the next digit's probabilities for every branch of the candidate trie).

Output: <output>/canary.json (config, canary, rank, exposure, log-perplexities, epsilon, utility)
and <output>/canary.md. Plain Keras training (tff_sim/plain_fedavg.py), no TFF.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models import dp_ftrl, fedavg
from models.dp import l2_norm

PREFIX = ("my", "pin", "number", "is")


@dataclasses.dataclass
class CanaryConfig:
    dataset: str = "chitchat"
    clients: int = 50  # training users (a seeded subset of the dataset's training clients)
    preset: str = "small"
    rounds: int = 40
    clients_per_round: int = 10  # expected; Poisson sampling with q = clients_per_round / clients
    copies: int = 10  # times the canary is inserted into the user's messages
    secret_len: int = 4
    client_lr: float = 0.5
    server_lr: float = 1.0
    batch_size: int = 16
    max_examples_per_client: int = 64
    clip: float = 0.5
    noise_multiplier: float = 1.0
    mechanism: str = "dp-fedavg"  # or "dp-ftrl" (see the module doc)
    extra_noise_multipliers: str = ""  # e.g. "0.3,0.1": further DP runs with these z (same clip)
    delta: float | None = None  # default 1e-6 (models.dp.DEFAULT_DELTA)
    seed: int = 0
    eval_examples: int = 1000
    output: str = "runs/canary"


# --------------------------------------------------------------------------- metrics


def rank_and_exposure(canary_score: float, candidate_scores: Sequence[float] | np.ndarray) -> tuple[int, float]:
    """(rank, exposure) of a canary among candidates (log-perplexities, lower = more likely).

    The candidates include the canary itself; rank = 1 + #candidates strictly more likely."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    scores = np.where(np.isfinite(scores), scores, np.inf)  # a broken (non-finite) score is least likely
    canary_score = float(canary_score) if np.isfinite(canary_score) else np.inf
    rank = 1 + int(np.sum(scores < canary_score))
    return rank, math.log2(len(scores)) - math.log2(rank)


def trie_log_perplexities(model: Any, prefix_ids: Sequence[int], alphabet_ids: Sequence[int], length: int,
                          batch: int = 500) -> np.ndarray:
    """Log-perplexity (over the secret tokens) of every candidate prefix + a_1..a_length, a_i in alphabet,
    in lexicographic order of the digit indices (candidate index = base-|alphabet| number)."""
    import tensorflow as tf

    k = len(alphabet_ids)
    alphabet = np.asarray(alphabet_ids, dtype=np.int32)
    heads = np.array(np.meshgrid(*[np.arange(k)] * (length - 1), indexing="ij")).reshape(length - 1, -1).T \
        if length > 1 else np.zeros((1, 0), dtype=np.int64)
    seqs = np.concatenate([np.tile(np.asarray([1, *prefix_ids], np.int32), (len(heads), 1)),
                           alphabet[heads].astype(np.int32)], axis=1)  # <bos> prefix a_1..a_{L-1}
    p0 = len(prefix_ids)  # position whose output predicts a_1
    logps = []
    for i in range(0, len(seqs), batch):
        logits = model(tf.constant(seqs[i:i + batch]), training=False)
        lp = tf.nn.log_softmax(logits[:, p0:, :], axis=-1).numpy()  # [b, L, V]
        logps.append(lp[:, :, alphabet])  # [b, L, k]
    lp = np.concatenate(logps)  # head h, position j -> log p(alphabet | <bos> prefix a_1..a_j)
    total = np.zeros((len(heads), k))
    for j in range(length - 1):
        total += lp[np.arange(len(heads)), j, heads[:, j]][:, None]
    total += lp[:, length - 1, :]
    return -total.reshape(-1)


# --------------------------------------------------------------------------- training


MECHANISMS = ("dp-fedavg", "dp-ftrl")


def _sample_rounds(n: int, q: float, rounds: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 77])
    return [np.flatnonzero(rng.random(n) < q) for _ in range(rounds)]


def epoch_cohorts(n: int, per_round: int, rounds: int, seed: int) -> list[np.ndarray]:
    """DP-FTRL's cohorts: each epoch a fresh shuffle cut into n // per_round rounds of per_round users (the
    rest sit the epoch out), so every user takes part at most once per epoch."""
    if not 1 <= per_round <= n:
        raise ValueError(f"clients_per_round must be in [1, {n}], got {per_round}")
    rng = np.random.default_rng([seed, 78])
    per_epoch = n // per_round
    cohorts: list[np.ndarray] = []
    while len(cohorts) < rounds:
        order = rng.permutation(n)
        cohorts += [np.sort(order[i * per_round:(i + 1) * per_round]) for i in range(per_epoch)]
    return cohorts[:rounds]


def rounds_per_epoch(n: int, per_round: int) -> int:
    return n // per_round


def _ftrl_params(cfg: CanaryConfig, n: int) -> dp_ftrl.FtrlParams:
    return dp_ftrl.FtrlParams(noise_multiplier=cfg.noise_multiplier, clients_per_round=cfg.clients_per_round,
                              clip=cfg.clip, restart_period=rounds_per_epoch(n, cfg.clients_per_round),
                              server_lr=cfg.server_lr)


def _train(trainer, init: list[np.ndarray], clients: list[tuple[np.ndarray, np.ndarray]], samples: list[np.ndarray],
           cfg: CanaryConfig, dp: bool, progress) -> tuple[list[np.ndarray], dict[str, Any]]:
    weights = [w.copy() for w in init]
    server_sgd = fedavg.ServerOptimizer("sgd", cfg.server_lr)
    rng = np.random.default_rng([cfg.seed, 99])
    expected = cfg.clients_per_round
    stats = {"clipped_fraction": [], "participants": []}
    ftrl = dp and cfg.mechanism == "dp-ftrl"
    if ftrl:
        ftrl_params = _ftrl_params(cfg, len(clients))
        ftrl_state = dp_ftrl.init(ftrl_params, sum(w.size for w in weights), cfg.seed)
    for r, chosen in enumerate(samples):
        if ftrl:
            updates = []  # TFF's sign: initial - trained; dp_ftrl clips, sums and adds the tree noise
            for c in chosen:
                new, _, _ = trainer.train(weights, _client_batches(clients[int(c)], cfg, r, int(c)))
                update = [w - t for w, t in zip(weights, new)]
                if all(np.isfinite(u).all() for u in update):
                    updates.append(update)
                else:
                    stats["non_finite_updates"] = stats.get("non_finite_updates", 0) + 1
            clipped = sum(l2_norm(u) > ftrl_state.clip for u in updates)
            weights, ftrl_state, _ = dp_ftrl.ftrl_round(weights, ftrl_state, ftrl_params, updates)
            stats["participants"].append(int(len(chosen)))
            stats["clipped_fraction"].append(clipped / max(1, len(chosen)))
            if progress:
                progress(r + 1, len(samples))
            continue
        total = [np.zeros_like(w, dtype=np.float64) for w in weights]
        weight_sum = 0.0
        clipped = 0
        for c in chosen:
            new, n_ex, _ = trainer.train(weights, _client_batches(clients[int(c)], cfg, r, int(c)))
            delta = [d.astype(np.float64) for d in fedavg.client_delta(new, weights)]
            if not all(np.isfinite(d).all() for d in delta):  # a diverged client: its update is dropped
                stats["non_finite_updates"] = stats.get("non_finite_updates", 0) + 1
                continue
            if dp:
                norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
                factor = min(1.0, cfg.clip / max(norm, 1e-12))
                clipped += factor < 1.0
                for t, d in zip(total, delta):
                    t += d * factor
                weight_sum += 1.0
            else:
                for t, d in zip(total, delta):
                    t += d * n_ex
                weight_sum += n_ex
        if dp:
            for t in total:
                t += rng.standard_normal(t.shape) * cfg.noise_multiplier * cfg.clip
            denom = float(expected)  # fixed denominator q * N (the DP-FedAvg estimator)
        else:
            denom = weight_sum
        if denom > 0 and (dp or len(chosen)):
            mean_delta = [t / denom for t in total]
            weights = fedavg.server_update(fedavg.ServerState(weights, {}), mean_delta, server_sgd).weights
        stats["participants"].append(int(len(chosen)))
        stats["clipped_fraction"].append(clipped / max(1, len(chosen)))
        if progress:
            progress(r + 1, len(samples))
    return weights, {"mean_participants": float(np.mean(stats["participants"])),
                     "mean_clipped_fraction": float(np.mean(stats["clipped_fraction"])) if dp else None,
                     "non_finite_updates": stats.get("non_finite_updates", 0)}


def _client_batches(client: tuple[np.ndarray, np.ndarray], cfg: CanaryConfig, r: int, c: int
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A client's round-r batches: a seeded shuffle of its examples, capped at max_examples_per_client."""
    x, y = client
    order = np.random.default_rng([cfg.seed, r, c]).permutation(len(x))[: cfg.max_examples_per_client]
    return [(x[order][i:i + cfg.batch_size], y[order][i:i + cfg.batch_size])
            for i in range(0, len(order), cfg.batch_size)]


def _evaluate(model, weights, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    import tensorflow as tf

    from models.keras_model import set_weights
    from models.metrics import evaluate_logits

    set_weights(model, weights)
    logits = np.concatenate([model(tf.constant(x[i:i + 256]), training=False).numpy() for i in range(0, len(x), 256)])
    m = evaluate_logits(logits, y)
    return {"loss": float(m["loss"]), "top1_recall": float(m["top1_recall"]), "top3_recall": float(m["top3_recall"])}


def run(cfg: CanaryConfig, log=print) -> dict[str, Any]:
    import tensorflow as tf

    from models import dp as dpm
    from models.config import preset
    from models.data import load_dataset
    from models.examples import make_examples
    from models.keras_model import build_model, get_weights, set_weights
    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary
    from tff_sim.plain_fedavg import KerasClientTrainer

    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    ds = load_dataset(cfg.dataset)
    if cfg.clients < len(ds.train_ids):
        ds = ds.subset(n_clients=cfg.clients)
    ids = sorted(ds.train_ids)
    sentences = {c: [t for m in ds.clients[c].train for t in tokenize_sentences(m)] for c in ids}
    ids = [c for c in ids if sentences[c]]
    base = preset(cfg.preset)
    alphabet = [str(i) for i in range(10)]
    prefix = list(PREFIX)
    # The canary's words are forced into the vocabulary (a large real vocabulary has them anyway).
    reserved = [alphabet + prefix] * 100_000
    vocab = Vocabulary.build([*reserved, *(s for c in ids for s in sentences[c])], size=base.vocab_size - 4)
    secret = [alphabet[i] for i in rng.integers(0, 10, cfg.secret_len)]
    canary_tokens = [*prefix, *secret]
    # the canary user: a user with a median amount of text
    by_size = sorted(ids, key=lambda c: (len(sentences[c]), c))
    user = by_size[len(by_size) // 2]
    config = preset(cfg.preset, vocab_size=len(vocab))
    clients, canary_index = [], ids.index(user)
    heldout_x, heldout_y = [], []
    for c in ids:
        sents = list(sentences[c])
        if c == user:
            positions = rng.integers(0, len(sents) + 1, cfg.copies)
            for p in sorted(positions, reverse=True):
                sents.insert(int(p), list(canary_tokens))
        x, y = make_examples(sents, vocab, config.seq_len)
        clients.append((x, y))
        tx, ty = make_examples([t for m in ds.clients[c].test for t in tokenize_sentences(m)], vocab, config.seq_len)
        heldout_x.append(tx)
        heldout_y.append(ty)
    ex, ey = np.concatenate(heldout_x)[: cfg.eval_examples], np.concatenate(heldout_y)[: cfg.eval_examples]
    n = len(clients)
    if cfg.mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {cfg.mechanism!r}")
    q = min(1.0, cfg.clients_per_round / n)
    ftrl = cfg.mechanism == "dp-ftrl"
    samples = epoch_cohorts(n, cfg.clients_per_round, cfg.rounds, cfg.seed) if ftrl else \
        _sample_rounds(n, q, cfg.rounds, cfg.seed)
    canary_rounds = int(sum(canary_index in s for s in samples))
    log(f"{n} users, vocab {len(vocab)}, model {cfg.preset} ({config.num_parameters()} parameters); canary "
        f"{' '.join(canary_tokens)!r} x{cfg.copies} in user {user}, who takes part in {canary_rounds} of {cfg.rounds} rounds ({cfg.mechanism} cohorts)")

    tf.keras.utils.set_random_seed(cfg.seed)
    init = get_weights(build_model(config, seed=cfg.seed))
    trainer = KerasClientTrainer(config, cfg.client_lr)
    scorer = build_model(config)
    prefix_ids = vocab.encode(prefix)
    alphabet_ids = vocab.encode(alphabet)
    canary_idx = int(sum(alphabet.index(d) * 10 ** (cfg.secret_len - 1 - i) for i, d in enumerate(secret)))
    delta = cfg.delta or dpm.DEFAULT_DELTA
    results: dict[str, Any] = {}
    runs = [("no_dp", None), ("dp", cfg.noise_multiplier)]
    runs += [(f"dp_z{z}", float(z)) for z in filter(None, cfg.extra_noise_multipliers.split(","))]
    for name, z in runs:
        use_dp = z is not None
        run_cfg = dataclasses.replace(cfg, noise_multiplier=z if use_dp else cfg.noise_multiplier)
        t0 = time.perf_counter()
        last = [0.0]

        def progress(r: int, total: int) -> None:
            if time.perf_counter() - last[0] > 10 or r == total:
                last[0] = time.perf_counter()
                log(f"  {name}: round {r}/{total}")

        weights, stats = _train(trainer, init, clients, samples, run_cfg, use_dp, progress)
        set_weights(scorer, weights)
        scores = trie_log_perplexities(scorer, prefix_ids, alphabet_ids, cfg.secret_len)
        rank, exposure = rank_and_exposure(scores[canary_idx], scores)
        entry = {"rank": rank, "exposure": exposure, "canary_log_perplexity": float(scores[canary_idx]),
                 "candidates_log_perplexity": {"min": float(scores.min()), "median": float(np.median(scores)),
                                               "max": float(scores.max())},
                 "utility": _evaluate(scorer, weights, ex, ey), "train_seconds": time.perf_counter() - t0, **stats}
        if use_dp and ftrl:
            k = rounds_per_epoch(n, cfg.clients_per_round)
            entry.update(noise_multiplier=z, clip=cfg.clip, mechanism=cfg.mechanism, rounds_per_epoch=k, delta=delta,
                         epsilon=dpm.ftrl_epsilon(z, cfg.rounds, delta, "restart", "rdp", rounds_per_epoch=k))
        elif use_dp:
            entry.update(noise_multiplier=z, clip=cfg.clip, mechanism=cfg.mechanism, sampling_prob=q, delta=delta,
                         epsilon=dpm.epsilon(z, q, cfg.rounds, delta, "rdp"))
        results[name] = entry
        log(f"  {name}: canary rank {rank} of {len(scores)}, exposure {exposure:.2f} bits"
            + (f", epsilon {entry['epsilon']:.2f} at delta {delta:.2g}" if use_dp else "")
            + f"; held-out top-1 recall {entry['utility']['top1_recall']:.3f}")
    # the untrained model, for reference
    set_weights(scorer, init)
    scores = trie_log_perplexities(scorer, prefix_ids, alphabet_ids, cfg.secret_len)
    rank, exposure = rank_and_exposure(scores[canary_idx], scores)
    results["untrained"] = {"rank": rank, "exposure": exposure}
    report = {"config": dataclasses.asdict(cfg), "canary": " ".join(canary_tokens), "canary_user": user,
              "candidates": 10 ** cfg.secret_len, "max_exposure": math.log2(10 ** cfg.secret_len),
              "users": n, "vocab_size": len(vocab), "parameters": config.num_parameters(),
              "canary_user_rounds": canary_rounds, "results": results,
              "seconds": time.perf_counter() - t_start}
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "canary.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "canary.md").write_text(markdown(report))
    log(f"wrote {out / 'canary.json'} and {out / 'canary.md'}")
    return report


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    r = report["results"]
    ftrl = cfg.get("mechanism", "dp-fedavg") == "dp-ftrl"
    rows = []
    labels = [("untrained", "untrained model"), ("no_dp", "FedAvg, no DP")]
    labels += [(k, f"{'DP-FTRL' if ftrl else 'DP-FedAvg'}, z = {r[k]['noise_multiplier']:g}")
               for k in r if k.startswith("dp")]
    for name, label in labels:
        e = r[name]
        util = e.get("utility") or {}
        eps = f"{e['epsilon']:.2f}" if "epsilon" in e else ("-" if name == "untrained" else "inf")
        top1 = f"{util['top1_recall']:.3f}" if "top1_recall" in util else "-"
        rows.append(f"| {label} | {e['rank']} | {e['exposure']:.2f} | {eps} | {top1} |")
    return "\n".join([
        "# Canary exposure (The Secret Sharer)",
        "",
        f"Canary `{report['canary']}` inserted {cfg['copies']} times into one of {report['users']} users' "
        f"messages ({cfg['dataset']}, `{cfg['preset']}` model, {report['parameters']:,} parameters); "
        f"{cfg['rounds']} rounds, {'' if ftrl else '~'}{cfg['clients_per_round']} users per round "
        f"({'epoch shuffles, each user at most once per epoch' if ftrl else 'Poisson'}), the canary's user "
        f"sampled in {report['canary_user_rounds']} rounds.",
        "",
        f"Rank among all {report['candidates']:,} candidates `{' '.join(report['canary'].split()[:-cfg['secret_len']])} "
        f"{' '.join(['D'] * cfg['secret_len'])}` by log-perplexity; exposure = log2(|R|) - log2(rank), "
        f"at most {report['max_exposure']:.2f} bits.",
        "",
        "| model | canary rank | exposure (bits) | epsilon | held-out top-1 recall |",
        "|---|---|---|---|---|",
        *rows,
        "",
        (f"DP-FTRL: clip {cfg['clip']}, tree-aggregation noise (nodes N(0, (z * clip)^2)) on the sums of the "
         f"clipped updates, trees restarted every epoch of {r['dp']['rounds_per_epoch']} rounds, denominator "
         f"{cfg['clients_per_round']}; delta {r['dp']['delta']:.2g} (RDP accounting of the tree-aggregation "
         f"mechanism, {cfg['rounds']} rounds, no sampling)." if ftrl else
         f"DP-FedAvg: clip {cfg['clip']}, Gaussian noise z * clip on the sum of the clipped updates, fixed "
         f"denominator q * N; delta {r['dp']['delta']:.2g} (RDP accounting, q = {r['dp']['sampling_prob']:.3f}, "
         f"{cfg['rounds']} rounds)."),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tff_sim.canary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(CanaryConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = {"int": int, "float": float, "str": str}.get(str(f.type).replace(" | None", ""), str)
        ap.add_argument(flag, dest=f.name, type=typ, default=None,
                        **({"choices": MECHANISMS} if f.name == "mechanism" else {}))
    args = ap.parse_args(argv)
    cfg = CanaryConfig(**{k: v for k, v in vars(args).items() if v is not None})
    report = run(cfg)
    print(json.dumps({k: {"rank": v["rank"], "exposure": round(v["exposure"], 3),
                          **({"epsilon": round(v["epsilon"], 3)} if "epsilon" in v else {})}
                      for k, v in report["results"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CanaryConfig", "MECHANISMS", "epoch_cohorts", "rank_and_exposure", "trie_log_perplexities", "run", "markdown", "main"]
