"""Reference numbers for the federated runs: unigram, Kneser-Ney n-gram and server-trained model.

    python -m models.baselines --preset small        # converged: early stopping on a validation split
    python -m models.baselines                       # the same for the gboard preset (about an hour on 2 cores)
    python -m models.baselines --quick               # capped: 1 epoch over 20,000 sentences, a few minutes
    python -m models.baselines --preset tiny --clients 150 --max-sentences 2000 --out /tmp/b
    python -m models.baselines --preset small --population donors --out artifacts/baselines-donors

Every model uses the vocabulary of the training clients' train split and is evaluated on
(a) "test": the training clients' test split (seen users, their most recent text) and
(b) "heldout": everything the held-out clients wrote (unseen users).
--population donors trains every model (and builds the vocabulary) from the donors' text only
(docs/donors.md; "test" is then the donors' test split, "heldout" is unchanged);
--vocab-source all|donors|wordfreq says where the vocabulary comes from (default: the population's).
The count models train on all pooled training sentences (seconds). The server-trained
Keras model trains to convergence: a seeded 5% of the training sentences (at most 5,000) is held
back as a validation split, each epoch ends with its loss, training stops after --patience
epochs without improvement (or --epochs, or --max-minutes) and the best epoch's weights are kept.
It checkpoints every epoch into <out>/checkpoint and the same command resumes there (--fresh
starts over). --quick is the old capped reference (one epoch over 20,000 sentences, no
validation). Evaluation uses a seeded sample of at most --max-eval-sentences per split, the same
sentences for every model. Writes results.json (read by tff_sim as reference rows),
results.csv, results.png, vocab.json, ngram-<order>.npz, unigram.npz, the server-trained
model bundle (server_trained/), TensorBoard logs and report.md into --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from models.config import NUM_SPECIAL_TOKENS, PRESETS, preset
from models.ngram import NgramModel, UnigramModel
from models.vocab import Vocabulary

DEFAULT_OUT = "artifacts/baselines"
# --quick: "a few minutes on 2 CPU cores": the LSTM (the slow part) one epoch over a sample.
QUICK_MAX_SENTENCES = 20_000
QUICK_EPOCHS = 1
DEFAULT_MAX_EVAL_SENTENCES = 5_000
DEFAULT_EPOCHS = 30  # an upper bound: early stopping ends the run first
DEFAULT_PATIENCE = 2
DEFAULT_MIN_DELTA = 1e-3
VALIDATION_FRACTION = 0.05
MAX_VALIDATION_SENTENCES = 5_000
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3
ROW_KEYS = ("model", "split", "top1_recall", "top3_recall", "perplexity", "tokens", "oov_rate",
            "top1_recall_in_vocab", "top3_recall_in_vocab", "loss", "sentences", "epochs", "train_seconds")
_METRIC_KEYS = ROW_KEYS[2:10]
SPLITS = ("test", "heldout")


def _row(model: str, split: str, metrics: dict[str, Any], sentences: int, epochs: int | None,
         train_seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "split": split}
    for key in _METRIC_KEYS:
        value = metrics[key]
        row[key] = int(value) if key == "tokens" else (None if not math.isfinite(value) else round(float(value), 6))
    row.update(sentences=sentences, epochs=epochs, train_seconds=round(float(train_seconds), 1))
    return row


def _dropped_lines(dropped: dict[str, Any]) -> list[str]:
    """Markdown bullets: each filter rule with the clients and items it removed."""
    rules = dropped.get("rules", {})
    clients, items = dropped.get("clients", {}), dropped.get("items", {})
    lines = []
    if dropped.get("clients_before") is not None:
        lines.append(f"- before filtering: {dropped['clients_before']} clients, {dropped.get('items_before', '?')} items")
    for key in sorted(set(rules) | set(clients) | set(items)):
        lines.append(f"- `{key}` ({rules.get(key, 'no description')}): {clients.get(key, 0)} clients, {items.get(key, 0)} items dropped")
    return lines


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'model':<16} {'split':<8} {'top-1':>7} {'top-3':>7} {'perplexity':>11} {'tokens':>9} {'OOV':>6} "
            f"{'epochs':>6} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = "inf" if r["perplexity"] is None else f"{r['perplexity']:.1f}"
        epochs = "-" if r.get("epochs") is None else str(r["epochs"])
        lines.append(
            f"{r['model']:<16} {r['split']:<8} {r['top1_recall']:>7.2%} {r['top3_recall']:>7.2%} {ppl:>11} "
            f"{r['tokens']:>9} {r['oov_rate']:>6.1%} {epochs:>6} {r.get('train_seconds', 0):>8.0f}"
        )
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | split | top-1 recall | top-3 recall | perplexity | tokens | OOV rate | top-1 in-vocab | epochs | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "inf" if r["perplexity"] is None else f"{r['perplexity']:.1f}"
        epochs = "-" if r.get("epochs") is None else str(r["epochs"])
        lines.append(f"| {r['model']} | {r['split']} | {r['top1_recall']:.2%} | {r['top3_recall']:.2%} | {ppl} | "
                     f"{r['tokens']} | {r['oov_rate']:.1%} | {r['top1_recall_in_vocab']:.2%} | {epochs} | "
                     f"{r.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)


def save_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Grouped bars: top-1 and top-3 recall per model, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        sub = [r for r in rows if r["split"] == split]
        xs = range(len(sub))
        for offset, key, label in ((-0.2, "top1_recall", "top-1"), (0.2, "top3_recall", "top-3")):
            bars = ax.bar([x + offset for x in xs], [100 * r[key] for r in sub], width=0.4, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), [r["model"] for r in sub])
        ax.set_title(f"{split} ({sub[0]['tokens']:,} tokens)" if sub else split)
        ax.set_ylabel("recall (%)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_baselines(
    dataset: str = "chitchat",
    out: str | os.PathLike = DEFAULT_OUT,
    preset_name: str = "gboard",
    vocab_size: int | None = None,
    order: int = 5,
    max_sentences: int | None = None,
    max_eval_sentences: int | None = DEFAULT_MAX_EVAL_SENTENCES,
    epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    max_minutes: float | None = None,
    quick: bool = False,
    fresh: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    clients: int | None = None,
    heldout_clients: int | None = None,
    full: bool = False,
    tensorboard: bool = True,
    verbose: bool = True,
    population: str = "all",
    vocab_source: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate the three baselines, write the artifacts into `out`, return results.json's dict.

    population: whose text trains the models: "all" training clients, or only the "donors" (or the
    "federated" ones, for comparison); --clients picks clients first, the population is taken among
    them. vocab_source: "all", "donors" or "wordfreq" (default: default_vocab_source(population)).

    quick: the capped reference (QUICK_MAX_SENTENCES, QUICK_EPOCHS, no validation) unless
    max_sentences/epochs say otherwise. patience 0: exactly `epochs` epochs, no validation split.
    """
    from tqdm import tqdm

    from models.bundle import save_bundle
    from models.central import evaluate_keras, sample_sentences, split_validation, token_lists, train_central
    from models.data import load_dataset
    from models.data.donors import build_vocab, check_population, default_vocab_source, donor_split_report, select_population

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    started = time.time()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 2)
        return time.time()

    if quick:
        max_sentences = max_sentences or QUICK_MAX_SENTENCES
        epochs = epochs if epochs != DEFAULT_EPOCHS else QUICK_EPOCHS
        patience = 0
    if full:
        max_sentences = max_eval_sentences = None
    # 0 or a negative cap means no cap, like --full for that one cap.
    max_sentences = max_sentences if max_sentences and max_sentences > 0 else None
    max_eval_sentences = max_eval_sentences if max_eval_sentences and max_eval_sentences > 0 else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    ds = load_dataset(dataset, seed=seed)
    if clients is not None or heldout_clients is not None:
        ds = ds.subset(n_clients=clients, n_heldout=heldout_clients)
    check_population(population)
    vocab_source = vocab_source or default_vocab_source(population)
    split_report = donor_split_report(ds)
    whole, ds = ds, select_population(ds, population)  # whole: every training client, donors and federated
    # Tokenize client by client (tqdm shows progress on the big corpora); sentences keep client order.
    def tokenized(ids: Sequence[str], parts: str, desc: str) -> list[list[str]]:
        result: list[list[str]] = []
        for cid in tqdm(ids, desc=desc, unit="client", leave=False, disable=None if verbose else True):  # None: off without a TTY
            c = ds.clients[cid]
            result.extend(token_lists(c.train if parts == "train" else c.test if parts == "test" else [*c.train, *c.test]))
        return result

    train = tokenized(ds.train_ids, "train", "tokenize train")
    evals_all = {"test": tokenized(ds.train_ids, "test", "tokenize test"),
                 "heldout": tokenized(ds.heldout_ids, "all", "tokenize heldout")}
    if vocab_size is None:
        vocab_size = PRESETS[preset_name].vocab_size - NUM_SPECIAL_TOKENS
    if vocab_source == population:  # the trained text itself (today's "all"): reuse its tokens
        vocab = Vocabulary.build(train, size=vocab_size)
    else:
        vocab = build_vocab(whole, vocab_source, vocab_size)
    config = preset(preset_name, vocab_size=len(vocab))
    evals = {split: sample_sentences(s, max_eval_sentences, seed + 1) for split, s in evals_all.items()}
    t = lap("data", t)
    if population != "all" or vocab_source != "all":
        say(f"population {population} ({split_report['donors']} donors, {split_report['federated']} federated, "
            f"donor fraction {split_report['donor_fraction']}, ids {split_report['donor_ids_sha256']}); "
            f"vocabulary from {vocab_source}")
    say(f"{dataset}: {len(ds.train_ids)} training clients ({len(train):,} train sentences), "
        f"{len(ds.heldout_ids)} held-out clients; vocabulary {len(vocab):,} ids; "
        f"eval sentences: " + ", ".join(f"{k} {len(v):,}/{len(evals_all[k]):,}" for k, v in evals.items()))

    rows: list[dict[str, Any]] = []

    def evaluate_all(name: str, evaluate, epochs_run: int | None, train_seconds: float) -> None:
        for split in SPLITS:
            rows.append(_row(name, split, evaluate(evals[split]), len(evals[split]), epochs_run, train_seconds))

    unigram = UnigramModel.train(train, vocab)
    t = lap("unigram", t)
    evaluate_all("unigram", unigram.evaluate, None, timings["unigram"])
    ngram = NgramModel.train(train, vocab, order=order)
    t = lap("ngram_train", t)
    say(f"{ngram.name}: {ngram.info['ngrams']} n-grams per order, trained in {timings['ngram_train']} s")
    evaluate_all(ngram.name, ngram.evaluate, None, timings["ngram_train"])
    t = lap("ngram_eval", t)

    fit_sentences, validation = (split_validation(train, VALIDATION_FRACTION, MAX_VALIDATION_SENTENCES, seed)
                                 if patience > 0 else (train, []))
    stop_rule = (f"early stopping (patience {patience}) on {len(validation):,} validation sentences, at most "
                 f"{epochs} epochs" if patience > 0 else f"{epochs} epoch(s)")
    say(f"server-trained ({preset_name}, {config.num_parameters():,} parameters): Adam lr {lr}, batch {batch_size}, "
        f"{stop_rule}, at most {max_sentences or 'all'} sentences")
    checkpoint = out / "checkpoint"
    if fresh and checkpoint.exists():
        shutil.rmtree(checkpoint)
    weights, history = train_central(
        ds, vocab, config, epochs=epochs, batch_size=batch_size, lr=lr, max_sentences=max_sentences, seed=seed,
        log_dir=str(out / "tensorboard") if tensorboard else None, verbose=None if verbose else 0,
        sentences=fit_sentences, validation=validation, patience=patience, min_delta=DEFAULT_MIN_DELTA,
        max_wall_s=None if max_minutes is None else 60.0 * max_minutes, checkpoint_dir=checkpoint,
    )
    t = lap("server_train", t)
    say(f"server-trained: {history['epochs']} epoch(s), best {history['best_epoch']} ({history['stopped']}), "
        f"{history['train_seconds']:.0f} s")
    evaluate_all("server-trained", lambda s: evaluate_keras(config, weights, s, vocab, progress=verbose),
                 history["best_epoch"], history["train_seconds"])
    t = lap("server_eval", t)

    # Artifacts: models first, then the result files that point at them.
    vocab.save(out / "vocab.json")
    ngram.save(out / f"{ngram.name}.npz")
    unigram.save(out / "unigram.npz")
    run_config = {
        "preset": preset_name, "model": config.to_dict(), "config_hash": config.config_hash(),
        "vocab_size": len(vocab), "vocab_hash": vocab.content_hash(), "order": order, "seed": seed,
        "max_sentences": max_sentences, "max_eval_sentences": max_eval_sentences, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "optimizer": "adam", "full": full, "quick": quick,
        "patience": patience, "validation_sentences": len(validation), "max_minutes": max_minutes,
        "clients": clients, "heldout_clients": heldout_clients,
        "population": population, "vocab_source": vocab_source,
    }
    save_bundle(out / "server_trained", config, vocab, weights, model_version=0,
                meta={"source": "models.baselines", "dataset": dataset, "history": history, "run": run_config})
    timings["total"] = round(time.time() - started, 2)
    results = {
        "dataset": dataset,
        "config": run_config,
        "rows": rows,
        "data": {
            "train_clients": len(ds.train_ids), "heldout_clients": len(ds.heldout_ids),
            "train_sentences": len(train), "train_tokens": sum(len(s) + 1 for s in train),
            "eval_sentences_available": {k: len(v) for k, v in evals_all.items()},
            "dropped": {k: v for k, v in ds.dropped.items() if k != "junk_senders"},
            "population": population,
            "donor_split": split_report,
        },
        "ngram": {"order": order, "discounts": ngram.discounts.round(4).tolist(), **ngram.info},
        "server_trained": history,
        "timings_s": timings,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifacts": {"vocab": "vocab.json", "ngram": f"{ngram.name}.npz", "unigram": "unigram.npz",
                      "server_trained_bundle": "server_trained", "plot": "results.png", "csv": "results.csv"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
        writer.writeheader()
        writer.writerows(rows)
    save_plot(rows, out / "results.png", f"{dataset} baselines (vocab {len(vocab) - NUM_SPECIAL_TOKENS:,}, {preset_name} preset)")
    (out / "report.md").write_text(_report(results, ds.dropped), encoding="utf-8")
    say("\n" + format_table(rows))
    say(f"\nwrote {out}/ (results.json, results.csv, results.png, report.md, models) in {timings['total']:.0f} s")
    return results


def _report(results: dict[str, Any], dropped: dict[str, Any]) -> str:
    c, d, h, tm = results["config"], results["data"], results["server_trained"], results["timings_s"]
    cap = lambda v: "none" if v is None else f"{v:,}"  # noqa: E731
    lines = [
        f"# Baselines on {results['dataset']}",
        "",
        f"Created {results['created']}; wall time {tm['total']:.0f} s "
        f"(data {tm['data']:.0f} s, unigram {tm['unigram']:.0f} s, n-gram train {tm['ngram_train']:.0f} s + eval "
        f"{tm['ngram_eval']:.0f} s, server-trained train {tm['server_train']:.0f} s + eval {tm['server_eval']:.0f} s).",
        "",
        _markdown_table(results["rows"]),
        "",
        "Recall as in Hard et al. 2018: the share of next-word targets (words and <eos>) among the top-k",
        "suggestions; <pad>, <bos>, <oov> are never suggested, so every OOV target is a miss (OOV rate above).",
        "",
        "## Data",
        "",
        f"- {d['train_clients']} training clients, {d['heldout_clients']} held-out clients; "
        f"{d['train_sentences']:,} training sentences ({d['train_tokens']:,} targets incl. <eos>).",
        f"- test = training clients' test split (their latest 20%); heldout = all text of the held-out clients.",
        f"- evaluation sample (seeded, same for every model): at most {cap(c['max_eval_sentences'])} sentences per split "
        f"of {', '.join(f'{k} {v:,}' for k, v in d['eval_sentences_available'].items())} available.",
        f"- vocabulary: {_vocab_words(c)} (+4 special ids), hash {c['vocab_hash']}.",
        f"- population: {d.get('population', 'all')} ({_split_line(d.get('donor_split'))}).",
        "",
        "Filters of the loader (what was dropped):",
        "",
        *_dropped_lines(dropped),
        "",
        "## Models",
        "",
        f"- unigram: add-one smoothed word frequencies; always suggests the most frequent words (the floor).",
        f"- ngram-{c['order']}: interpolated modified Kneser-Ney, discounts per order {results['ngram']['discounts']}, "
        f"n-grams per order {results['ngram']['ngrams']}; trained on all {d['train_sentences']:,} training sentences.",
        f"- server-trained: the {c['preset']} CIFG model ({c['model']}) trained centrally on the pooled training "
        f"sentences: Adam lr {c['lr']} (chosen over SGD for fast convergence on a CPU budget), batch {c['batch_size']}, "
        f"at most {c['epochs']} epoch(s), at most {cap(c['max_sentences'])} sentences (used {h['sentences']:,}, "
        f"{h['examples']:,} windows, {h['steps_per_epoch']} steps/epoch). "
        + (f"Early stopping: {h['validation_sentences']:,} validation sentences (a seeded 5% of the training "
           f"sentences, not trained on), patience {c['patience']}; ran {h['epochs']} epoch(s), kept epoch "
           f"{h['best_epoch']} ({h['stopped']}); {h['train_seconds']:.0f} s of training."
           if c.get("patience") else f"No validation split (fixed epochs); {h['train_seconds']:.0f} s of training."),
        f"- training loss per epoch {[round(x, 3) for x in h.get('loss', [])]}"
        + (f"; validation loss {[round(x, 3) for x in h.get('val_loss', [])]}, validation top-1 "
           f"{[round(100 * x, 2) for x in h.get('val_top1', [])]}%." if h.get("val_loss") else "."),
        "",
        "Caps: " + ("none (--full)." if c["full"] else
                    f"--max-sentences {cap(c['max_sentences'])} for the server-trained model, --max-eval-sentences "
                    f"{cap(c['max_eval_sentences'])}; run with --full to evaluate on every sentence."),
        "",
    ]
    return "\n".join(lines)


def _vocab_words(c: dict[str, Any]) -> str:
    n = f"{c['vocab_size'] - NUM_SPECIAL_TOKENS:,}"
    source = c.get("vocab_source", "all")
    if source == "wordfreq":
        return f"{n} words of public English word frequencies (wordfreq, no user's text)"
    if source == "donors":
        return f"top {n} words of the donors' train split"
    return f"top {n} words of the training clients' train split"


def _split_line(split: dict[str, Any] | None) -> str:
    if not split:
        return "no donor split recorded"
    return (f"donors: a seeded {split['donor_fraction']:.0%} of the {split['train_clients']} training clients "
            f"(seed {split['seed']}): {split['donors']} donors (ids sha256 {split['donor_ids_sha256']}), "
            f"{split['federated']} federated; docs/donors.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chitchat", help="chitchat, shakespeare, a .txt file or a folder")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--preset", default="gboard", choices=sorted(PRESETS), help="server-trained model preset")
    parser.add_argument("--vocab-size", type=int, default=None, help="words in the vocabulary (default: the preset's, 10,000 for gboard)")
    parser.add_argument("--order", type=int, default=5, help="n-gram order (default 5)")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help=f"server-trained model: train on at most this many sentences (default all; --quick {QUICK_MAX_SENTENCES:,})")
    parser.add_argument("--max-eval-sentences", type=int, default=DEFAULT_MAX_EVAL_SENTENCES,
                        help=f"evaluate on at most this many sentences per split, 0 = all (default {DEFAULT_MAX_EVAL_SENTENCES:,})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"most epochs of the server-trained model (default {DEFAULT_EPOCHS}: early stopping ends it first)")
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                        help=f"stop after this many epochs without a better validation loss (default {DEFAULT_PATIENCE}; "
                             "0: no validation split, exactly --epochs)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after the epoch that crosses this")
    parser.add_argument("--quick", action="store_true",
                        help=f"the capped reference: {QUICK_EPOCHS} epoch over {QUICK_MAX_SENTENCES:,} sentences, no early stopping")
    parser.add_argument("--fresh", action="store_true", help="discard <out>/checkpoint instead of resuming from it")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="held-out clients, samples, initialisation")
    parser.add_argument("--clients", type=int, default=None, help="use only this many training clients (quick runs)")
    parser.add_argument("--heldout-clients", type=int, default=None, help="use only this many held-out clients")
    parser.add_argument("--full", action="store_true", help="no caps: all training and evaluation sentences")
    parser.add_argument("--population", default="all", choices=("all", "donors", "federated"),
                        help="whose text trains the models: all training clients (default) or only the donors "
                             "(docs/donors.md); held-out evaluation is unchanged")
    parser.add_argument("--vocab-source", default=None, choices=("all", "donors", "wordfreq"),
                        help="vocabulary from all training clients' text, the donors' text, or public word "
                             "frequencies (wordfreq); default: the population's (all -> all, else donors)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard logs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models import interrupts

    interrupts.install()
    try:
        run_baselines(
            dataset=args.dataset, out=args.out, preset_name=args.preset, vocab_size=args.vocab_size, order=args.order,
            max_sentences=args.max_sentences, max_eval_sentences=args.max_eval_sentences, epochs=args.epochs,
            patience=args.patience, max_minutes=args.max_minutes, quick=args.quick, fresh=args.fresh,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, clients=args.clients,
            heldout_clients=args.heldout_clients, full=args.full, tensorboard=not args.no_tensorboard,
            verbose=not args.quiet, population=args.population, vocab_source=args.vocab_source,
        )
    except BaseException as exc:
        code = interrupts.stop_code(exc)
        print(f"\ninterrupted ({exc}): results.json and the table in {args.out} were not updated; the same command "
              f"resumes training from the last finished epoch in {args.out}/checkpoint", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
