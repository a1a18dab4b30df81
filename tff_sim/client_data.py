"""A FederatedDataset as numpy examples per client, and per-round tf.data datasets.

Every client's text is tokenized once into (x, y) windows (models.examples). A round's
dataset for a client is a seeded subset of at most max_examples_per_client examples in a
seeded order (sampling.example_order), batched; the plain Keras loop of the benchmarks
and the TFF process get the very same batches from `client_batches`.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from models.central import sample_sentences
from models.config import ModelConfig, preset
from models.data import FederatedDataset, load_dataset
from models.data.types import seeded_order
from models.examples import make_examples
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary
from tff_sim.sampling import example_order

NUM_SPECIAL = 4


@dataclasses.dataclass
class ClientExamples:
    client_id: str
    index: int  # stable position among the training clients (seeds the batch order)
    x: np.ndarray  # int32 [n, seq_len]
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass
class SimData:
    """Everything the simulation trains and evaluates on."""

    dataset: FederatedDataset
    vocab: Vocabulary
    model_config: ModelConfig
    train: dict[str, ClientExamples]  # training clients with at least one example
    train_ids: list[str]  # sorted ids of `train`
    eval_clients: dict[str, ClientExamples]  # held-out clients for the periodic federated evaluation
    test_sentences: list[list[str]]  # training clients' test split (seen users), tokenized sentences
    heldout_sentences: list[list[str]]  # all text of the held-out clients (unseen users)
    population_name: str = "all"  # whose text trains: all training clients, "donors" or "federated" (docs/donors.md)
    vocab_source: str = "all"  # all | donors | wordfreq | bundle
    donor_split: dict | None = None  # models.data.donors.donor_split_report of the dataset
    initial_weights: list[np.ndarray] | None = None  # from --init-bundle (None: the seeded random init)
    init_bundle: dict | None = None  # where the initial weights came from

    @property
    def population(self) -> int:
        return len(self.train_ids)

    def summary(self) -> dict:
        sizes = np.array([len(c) for c in self.train.values()]) if self.train else np.zeros(1)
        return {
            "dataset": self.dataset.name,
            "train_clients": self.population,
            "heldout_clients": len(self.dataset.heldout_ids),
            "eval_clients": len(self.eval_clients),
            "vocab_size": len(self.vocab),
            "train_examples": int(sizes.sum()),
            "examples_per_client_min_median_max": [int(sizes.min()), float(np.median(sizes)), int(sizes.max())],
            "test_sentences": len(self.test_sentences),
            "heldout_sentences": len(self.heldout_sentences),
            "population_name": self.population_name,
            "vocab_source": self.vocab_source,
            "vocab_hash": self.vocab.content_hash(),
            "donor_split": self.donor_split,
            **({"init_bundle": self.init_bundle} if self.init_bundle else {}),
        }


def _trained_population(meta: dict) -> str:
    """Whose text trained a bundle: tff_sim's exports say it under "run", models.pretrained under "data"."""
    for key in ("run", "data"):
        if isinstance(meta.get(key), dict) and meta[key].get("population"):
            return str(meta[key]["population"])
    return "all"


def tokenized(texts: Iterable[str]) -> list[list[str]]:
    return [tokens for text in texts for tokens in tokenize_sentences(text)]


def build_vocab(ds: FederatedDataset, size: int) -> Vocabulary:
    """Top `size` words of the training clients' train split (what the federation trains on)."""
    return Vocabulary.build(tokenized(ds.all_train_sentences()), size=size)


def prepare(
    dataset: str | FederatedDataset = "chitchat",
    *,
    preset_name: str = "gboard",
    vocab_size: int | None = None,
    vocab: Vocabulary | None = None,
    data_seed: int = 0,
    max_train_clients: int | None = None,
    eval_clients: int = 20,
    eval_max_examples_per_client: int = 128,
    final_eval_max_sentences: int | None = None,
    population: str = "all",
    vocab_source: str | None = None,
    init_bundle: str | None = None,
) -> SimData:
    """Load (or take) a dataset, build the vocabulary and model config, make the examples.

    population: train on all training clients, only the "federated" ones or only the "donors"
    (models/data/donors.py; max_train_clients picks clients first, the population is taken among
    them). vocab_source: "all", "donors" or "wordfreq" (default: "all" for population "all", else
    "donors"). init_bundle: a model bundle (e.g. models.baselines' server_trained/) whose vocabulary,
    config (it must be this preset's) and weights the run starts from.
    """
    from models.data.donors import (build_vocab as build_source_vocab, check_population, default_vocab_source,
                                    donor_split_report, select_population)

    ds = dataset if isinstance(dataset, FederatedDataset) else load_dataset(dataset, seed=data_seed)
    if max_train_clients is not None and max_train_clients < len(ds.train_ids):
        ds = ds.subset(n_clients=max_train_clients)
    check_population(population)
    split_report = donor_split_report(ds)
    full, ds = ds, select_population(ds, population)
    base = preset(preset_name)
    initial, init_info = None, None
    if init_bundle is not None:
        from models.bundle import load_bundle

        if vocab is not None or vocab_source is not None or vocab_size is not None:
            raise ValueError("--init-bundle brings its own vocabulary: drop --vocab-source / --vocab-size")
        bundle = load_bundle(init_bundle)
        vocab = bundle.vocab
        want = preset(preset_name, vocab_size=len(vocab))
        if bundle.config.config_hash() != want.config_hash():
            raise ValueError(f"{init_bundle}: the bundle's model ({bundle.config.to_dict()}) is not preset "
                             f"{preset_name!r} with its {len(vocab)}-token vocabulary; use its --preset")
        initial = [np.array(w, dtype=np.float32, copy=True) for w in bundle.weights]
        init_info = {"path": str(init_bundle), "model_version": bundle.model_version, "vocab_hash": vocab.content_hash(),
                     "config_hash": bundle.config.config_hash(), "source": bundle.meta.get("source"),
                     "population": _trained_population(bundle.meta)}
        source = "bundle"
    elif vocab is None:
        words = (vocab_size or base.vocab_size) - NUM_SPECIAL
        source = vocab_source or default_vocab_source(population)
        if source == "all" and population == "all":
            vocab = build_vocab(ds, words)
        else:
            vocab = build_source_vocab(full, source, words)
    else:
        source = vocab_source or "given"
    config = preset(preset_name, vocab_size=len(vocab))
    seq_len = config.seq_len

    train: dict[str, ClientExamples] = {}
    for index, cid in enumerate(ds.train_ids):
        x, y = make_examples(tokenized(ds.clients[cid].train), vocab, seq_len)
        if len(x):
            train[cid] = ClientExamples(cid, index, x, y)

    heldout_order = seeded_order(ds.heldout_ids, ds.seed, "tff_eval")
    chosen = heldout_order if eval_clients == 0 else heldout_order[:eval_clients]
    evals: dict[str, ClientExamples] = {}
    for index, cid in enumerate(sorted(chosen)):
        c = ds.clients[cid]
        x, y = make_examples(tokenized([*c.train, *c.test]), vocab, seq_len)
        if len(x):
            evals[cid] = ClientExamples(cid, index, x[:eval_max_examples_per_client], y[:eval_max_examples_per_client])

    return SimData(
        dataset=ds,
        vocab=vocab,
        model_config=config,
        train=train,
        train_ids=sorted(train),
        eval_clients=evals,
        # The same seeded sentence sample as models.baselines evaluates on (seed + 1, per split),
        # so with the same dataset and vocabulary the figures are directly comparable.
        test_sentences=sample_sentences(tokenized(ds.all_test_sentences()), final_eval_max_sentences, ds.seed + 1),
        heldout_sentences=sample_sentences(tokenized(ds.heldout_sentences()), final_eval_max_sentences, ds.seed + 1),
        population_name=population,
        vocab_source=source,
        donor_split=split_report,
        initial_weights=initial,
        init_bundle=init_info,
    )


def round_epochs(
    client: ClientExamples, round_num: int, seed: int, epochs: int, max_examples: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (x, y) a client trains on in one round, one pair per local epoch, in training order.

    The first epoch's seeded permutation picks at most max_examples examples; each further
    epoch revisits that subset in a fresh seeded order.
    """
    order = example_order(len(client), seed, round_num, client.index, 0)[:max_examples]
    out = [(client.x[order], client.y[order])]
    for epoch in range(1, epochs):
        idx = order[example_order(len(order), seed, round_num, client.index, epoch)]
        out.append((client.x[idx], client.y[idx]))
    return out


def client_batches(
    client: ClientExamples, round_num: int, seed: int, epochs: int, batch_size: int, max_examples: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """round_epochs cut into batches (each epoch batched on its own: a short last batch per epoch)."""
    return [
        (x[i:i + batch_size], y[i:i + batch_size])
        for x, y in round_epochs(client, round_num, seed, epochs, max_examples)
        for i in range(0, len(x), batch_size)
    ]


def client_dataset(client: ClientExamples, round_num: int, seed: int, epochs: int, batch_size: int,
                   max_examples: int):
    """A tf.data.Dataset of exactly the batches of client_batches (same order, same sizes)."""
    import tensorflow as tf

    dataset = None
    for x, y in round_epochs(client, round_num, seed, epochs, max_examples):
        part = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        dataset = part if dataset is None else dataset.concatenate(part)
    return dataset


def eval_dataset(client: ClientExamples, batch_size: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((client.x, client.y)).batch(batch_size)
