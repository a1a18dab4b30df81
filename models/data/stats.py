"""Dataset statistics: clients, words, examples per client, OOV rates, what was dropped."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from models.data.types import FederatedDataset
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary


def _token_lists(items: Iterable[str]) -> list[list[str]]:
    return [tokens for text in items for tokens in tokenize_sentences(text)]


def _num_words(tokens: Sequence[str]) -> int:
    return sum(1 for t in tokens if any(ch.isalnum() for ch in t))


def _spread(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0, "mean": 0.0}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def _oov(token_lists: Iterable[Sequence[str]], vocab: Vocabulary) -> dict[str, float]:
    tokens = oov = 0
    for toks in token_lists:
        tokens += len(toks)
        oov += sum(1 for t in toks if t not in vocab)
    return {"tokens": tokens, "oov_rate": round(oov / tokens, 5) if tokens else 0.0}


def dataset_stats(ds: FederatedDataset, vocab_size: int = 10_000) -> dict[str, Any]:
    """Numbers for reports. Examples = sentences as the model sees them (tokenize_sentences).

    The vocabulary is Vocabulary.build(size=vocab_size) over the training clients' train
    split only, as federated training would build it; OOV rates are over word and
    punctuation tokens (no <bos>/<eos>) of: train split of training clients, test split
    of training clients (seen users), and both splits of held-out clients (unseen users).
    """
    per_client: dict[str, tuple[list[list[str]], list[list[str]]]] = {
        cid: (_token_lists(c.train), _token_lists(c.test)) for cid, c in ds.clients.items()
    }
    train_lists = [t for cid in ds.train_ids for t in per_client[cid][0]]
    vocab = Vocabulary.build(train_lists, size=vocab_size)
    # (examples, tokens, words) per client; words = tokens with a letter or digit (no punctuation/emoji).
    sizes = {
        cid: (len(tr) + len(te), sum(map(len, tr)) + sum(map(len, te)), sum(_num_words(t) for t in (*tr, *te)))
        for cid, (tr, te) in per_client.items()
    }
    dropped = ds.dropped
    return {
        "dataset": ds.name,
        "seed": ds.seed,
        "unit": ds.info.get("unit", "item"),
        "clients": {
            "before_filters": dropped.get("clients_before"),
            "kept": len(ds.clients),
            "train": len(ds.train_ids),
            "heldout": len(ds.heldout_ids),
            "dropped": sum(dropped.get("clients", {}).values()),
        },
        "items": {
            "train": sum(len(c.train) for c in ds.clients.values()),
            "test": sum(len(c.test) for c in ds.clients.values()),
        },
        "examples": sum(n for n, _, _ in sizes.values()),
        "tokens": sum(t for _, t, _ in sizes.values()),
        "words": sum(w for _, _, w in sizes.values()),
        "examples_per_client": _spread([n for n, _, _ in sizes.values()]),
        "words_per_client": _spread([w for _, _, w in sizes.values()]),
        "vocab": {"size": len(vocab), "requested": vocab_size, "hash": vocab.content_hash()},
        "oov": {
            "train": _oov(train_lists, vocab),
            "test": _oov((t for cid in ds.train_ids for t in per_client[cid][1]), vocab),
            "heldout": _oov((t for cid in ds.heldout_ids for lists in per_client[cid] for t in lists), vocab),
        },
        "dropped": dropped,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of dataset_stats output."""
    c, unit = stats["clients"], stats["unit"]
    rows: list[tuple[str, str]] = [
        ("dataset", f"{stats['dataset']} (seed {stats['seed']}, items are {unit}s)"),
        ("clients", f"{c['kept']} kept = {c['train']} train + {c['heldout']} held out; "
                    f"{c['dropped']} dropped of {c['before_filters']}"),
        (f"{unit}s", f"{stats['items']['train']:,} train + {stats['items']['test']:,} test"),
        ("examples (sentences)", f"{stats['examples']:,}"),
        ("words", f"{stats['words']:,} ({stats['tokens']:,} tokens with punctuation and emoji)"),
    ]
    for key, label in (("examples_per_client", "examples/client"), ("words_per_client", "words/client")):
        s = stats[key]
        rows.append((label, f"min {s['min']}, median {s['median']:g}, max {s['max']}, mean {s['mean']}"))
    v = stats["vocab"]
    rows.append(("vocabulary", f"{v['size']:,} tokens incl. 4 special (top {v['requested']:,} of train split)"))
    for split, label in (("train", "OOV train"), ("test", "OOV test (seen users)"), ("heldout", "OOV held-out users")):
        o = stats["oov"][split]
        rows.append((label, f"{o['oov_rate']:.2%} of {o['tokens']:,} tokens"))
    d = stats["dropped"]
    for reason, n in d.get("clients", {}).items():
        if n:
            rows.append((f"dropped clients: {reason}", f"{n:,}"))
    for reason, n in d.get("items", {}).items():
        if n:
            rows.append((f"dropped {unit}s: {reason}", f"{n:,}"))
    for s in d.get("junk_senders", [])[:5]:
        rows.append(("  junk sender", f"{s['id']}: {s['messages']} messages, {s['junk_fraction']:.0%} junk {s['issues']}"))
    rows.extend((f"rule {reason}", rule) for reason, rule in d.get("rules", {}).items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)
