"""Donors and the federated population: who may be used centrally, and who only through rounds.

In a deployment, the starting model and the vocabulary come from data the operator may use:
public text, or users who chose to donate theirs. Everyone else's text reaches a model only
through (DP) federated rounds. The simulation mirrors this by splitting the training users:

  * donors: a seeded `donor_fraction` (default types.DEFAULT_DONOR_FRACTION = 0.1) of
    `train_ids`, chosen like the held-out users (sha256 ranking, salt "donors"): their text
    may build the vocabulary, pre-train a model and train the n-gram baselines;
  * federated: the other training users: their text is used only by federated rounds;
  * held-out users stay apart from both (the held-out split is unchanged).

A dataset's donors are fixed when it is built (FederatedDataset.donor_ids); a subset keeps
each client's status. Consumers take one option each (default "all": everything as before):
`models.baselines --population donors`, `python -m tff_sim --population federated`,
`--vocab-source all|donors|wordfreq`, and the fleet's `--population federated`. docs/donors.md.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

from models.data.types import DEFAULT_DONOR_FRACTION, DONOR_SALT, POPULATIONS, FederatedDataset, choose_donors

VOCAB_SOURCES = ("all", "donors", "wordfreq")

__all__ = ["DEFAULT_DONOR_FRACTION", "POPULATIONS", "VOCAB_SOURCES", "build_vocab", "check_population",
           "choose_donors", "default_vocab_source", "donor_split_report", "ids_hash", "select_population",
           "vocab_texts"]


def check_population(population: str) -> str:
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
    return population


def ids_hash(ids: Sequence[str]) -> str:
    """A short fingerprint of an id list (sorted, newline-joined, sha256, 16 hex digits)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:16]


def donor_split_report(ds: FederatedDataset) -> dict[str, Any]:
    """What reports record about the split: fraction, seed, counts, fingerprints of the id lists."""
    donors, federated = list(ds.donor_ids or ()), ds.federated_ids
    return {
        "donor_fraction": ds.donor_fraction,
        "seed": ds.seed,
        "salt": DONOR_SALT,
        "train_clients": len(ds.train_ids),
        "donors": len(donors),
        "federated": len(federated),
        "heldout": len(ds.heldout_ids),
        "donor_train_items": sum(len(ds.clients[c].train) for c in donors),
        "federated_train_items": sum(len(ds.clients[c].train) for c in federated),
        "donor_ids_sha256": ids_hash(donors),
        "federated_ids_sha256": ids_hash(federated),
    }


def select_population(ds: FederatedDataset, population: str = "all") -> FederatedDataset:
    """The dataset with only `population`'s training clients ("all": `ds` itself, unchanged).

    Held-out clients are kept as they are. The result's info records the population and the
    split it came from (donor_split_report of `ds`).
    """
    check_population(population)
    if population == "all":
        return ds
    ids = ds.population_ids(population)
    if not ids:
        raise ValueError(f"{ds.name}: population {population!r} is empty ({len(ds.train_ids)} training clients, "
                         f"donor fraction {ds.donor_fraction})")
    sub = ds.subset(ids=[*ids, *ds.heldout_ids])
    sub.info = {**sub.info, "population": population, "donor_split": donor_split_report(ds)}
    return sub


def default_vocab_source(population: str = "all") -> str:
    """Where the vocabulary comes from when not said: "all" for the whole population (as before),
    else "donors" (a federated population's text must not be used centrally)."""
    return "all" if check_population(population) == "all" else "donors"


def vocab_texts(ds: FederatedDataset, source: str) -> list[str]:
    """The raw train items a vocabulary source reads: "all" = every training client's, "donors" = the
    donors' (of `ds`, before any population selection)."""
    if source == "all":
        return ds.all_train_sentences()
    if source == "donors":
        return ds.all_train_sentences(ds.donor_ids)
    raise ValueError(f"vocabulary source {source!r} reads no users' text (expected 'all' or 'donors')")


def build_vocab(ds: FederatedDataset | None, source: str, size: int):
    """A Vocabulary of `size` words from `source` ("all", "donors": top words of those users' train
    split, tokenized as the model sees it; "wordfreq": public word frequencies, no user's text)."""
    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary

    if source not in VOCAB_SOURCES:
        raise ValueError(f"vocabulary source must be one of {VOCAB_SOURCES}, got {source!r}")
    if source == "wordfreq":
        return Vocabulary.from_wordfreq(size)
    if ds is None:
        raise ValueError(f"vocabulary source {source!r} needs a dataset")
    return Vocabulary.build((toks for text in vocab_texts(ds, source) for toks in tokenize_sentences(text)), size=size)


def heldout_oov_rates(ds: FederatedDataset, sizes: Sequence[int] = (5_000, 10_000),
                      sources: Sequence[str] = VOCAB_SOURCES) -> list[dict[str, Any]]:
    """The share of held-out next-word targets (words and <eos>, as models.baselines counts them)
    that fall outside each source's vocabulary, per vocabulary size (all held-out text, no sample)."""
    from collections import Counter

    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary

    heldout: Counter[str] = Counter()
    sentences = 0
    for text in ds.heldout_sentences():
        for toks in tokenize_sentences(text):
            heldout.update(toks)
            sentences += 1
    targets = sum(heldout.values()) + sentences
    counted = {s: [t for text in vocab_texts(ds, s) for t in tokenize_sentences(text)] for s in sources if s != "wordfreq"}
    rows = []
    for size in sizes:
        for source in sources:
            vocab = (Vocabulary.from_wordfreq(size) if source == "wordfreq"
                     else Vocabulary.build(counted[source], size=size))
            oov = sum(n for tok, n in heldout.items() if tok not in vocab)
            rows.append({"source": source, "size": size, "vocab_hash": vocab.content_hash(),
                         "heldout_targets": targets, "oov_rate": round(oov / max(1, targets), 5)})
    return rows



def format_oov_table(split: dict[str, Any], rows: Sequence[dict[str, Any]], name: str = "") -> str:
    """The split in one line, then held-out OOV per vocabulary source and size (python -m models.data donors)."""
    lines = [f"{name}: {split['train_clients']} training clients = {split['donors']} donors "
             f"({split['donor_train_items']:,} train items, ids {split['donor_ids_sha256']}) + {split['federated']} "
             f"federated ({split['federated_train_items']:,}); {split['heldout']} held out; fraction "
             f"{split['donor_fraction']}, seed {split['seed']}",
             f"{'vocabulary':<10} {'words':>7} {'held-out OOV':>13}"]
    lines += [f"{r['source']:<10} {r['size']:>7,} {r['oov_rate']:>13.2%}" for r in rows]
    return "\n".join(lines)
