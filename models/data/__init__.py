"""Federated text datasets for the keyboard (numpy/stdlib only; never imports TensorFlow).

    ds = load_dataset("chitchat")            # or "shakespeare", a .txt file, a folder of .txt
    ds.train_ids, ds.heldout_ids             # disjoint, sorted client ids
    ds.clients["<id>"].train / .test         # raw text items, oldest first
    ds.all_train_sentences()                 # training clients' train items
    ds.dropped                               # what the filters removed, and the rules
    ds.donor_ids, ds.federated_ids           # the training clients split: donors | federated (donors.py)
    select_population(ds, "federated")       # only those training clients ("all": ds itself)

Split rules (80/20 by time, no train copy of a test item, seeded held-out clients) are
in models/data/split.py; each loader's filters are in its module docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models.data.chitchat import load_chitchat
from models.data.shakespeare import load_shakespeare
from models.data.textfiles import load_text_files, load_text_folder
from models.data.donors import VOCAB_SOURCES, donor_split_report, select_population
from models.data.types import DEFAULT_DONOR_FRACTION, POPULATIONS, ClientData, FederatedDataset

DATASETS = ("chitchat", "shakespeare")


def load_dataset(name: str, **kwargs: Any) -> FederatedDataset:
    """"chitchat", "shakespeare", a folder of .txt files (one client per file), or a
    single text file (one client, id "me" unless client_id= is given)."""
    if name == "chitchat":
        return load_chitchat(**kwargs)
    if name == "shakespeare":
        return load_shakespeare(**kwargs)
    path = Path(name)
    if path.is_dir():
        return load_text_folder(path, **kwargs)
    if path.is_file():
        return load_text_files(path, **kwargs)
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS} or a path to a .txt file or folder")


__all__ = [
    "ClientData",
    "FederatedDataset",
    "DATASETS",
    "DEFAULT_DONOR_FRACTION",
    "POPULATIONS",
    "VOCAB_SOURCES",
    "donor_split_report",
    "select_population",
    "load_dataset",
    "load_chitchat",
    "load_shakespeare",
    "load_text_files",
    "load_text_folder",
]
