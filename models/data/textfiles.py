"""A user's own plain-text files as federated clients (e.g. to personalise on your own writing).

Each file is read as UTF-8 (undecodable bytes replaced), cut into paragraphs at blank
lines, each paragraph's lines joined with spaces (hard-wrapped prose stays one
paragraph) and split into sentences with models.tokenizer.split_sentences. A file's
sentences in file order are its items; files are taken in sorted path order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from models.data.split import DEFAULT_TEST_FRACTION, build_federated
from models.data.types import FederatedDataset
from models.tokenizer import split_sentences

MIN_SENTENCES = 2  # the least that still gives one train and one test sentence
_PARAGRAPH_RE = re.compile(r"\n\s*\n")


def text_sentences(text: str) -> list[str]:
    """Sentences of a text: paragraphs at blank lines, lines within one joined."""
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_RE.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        joined = " ".join(paragraph.split())
        sentences.extend(split_sentences(joined))
    return sentences


def expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files named, plus the *.txt files (recursively) of folders named; sorted, no repeats."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            files.update(f for f in p.rglob("*.txt") if f.is_file())
        elif p.is_file():
            files.add(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return sorted(files)


def read_sentences(path: str | Path) -> list[str]:
    return text_sentences(Path(path).read_text(encoding="utf-8", errors="replace"))


def load_text_files(
    paths: str | Path | Iterable[str | Path],
    client_id: str = "me",
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    min_sentences: int = MIN_SENTENCES,
    seed: int = 0,
) -> FederatedDataset:
    """All the files' sentences as ONE client `client_id` (nothing held out).

    Raises ValueError if there are fewer than `min_sentences` sentences.
    """
    files = expand_paths(paths)
    sentences = [s for f in files for s in read_sentences(f)]
    ds = _build("textfiles", {client_id: sentences}, files, test_fraction, min_sentences, 0.0, seed)
    if client_id not in ds.clients:
        raise ValueError(f"{len(sentences)} sentences in {len(files)} file(s); need at least {min_sentences}")
    return ds


def load_text_folder(
    folder: str | Path,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    heldout_fraction: float = 0.0,
    min_sentences: int = MIN_SENTENCES,
    seed: int = 0,
) -> FederatedDataset:
    """A folder of .txt files as one client per file (client id = path relative to the folder).

    Files with fewer than `min_sentences` sentences are dropped and counted.
    """
    root = Path(folder)
    files = expand_paths(root)
    items = {f.relative_to(root).as_posix(): read_sentences(f) for f in files}
    return _build(root.name or "texts", items, files, test_fraction, min_sentences, heldout_fraction, seed)


def _build(name: str, items: dict[str, list[str]], files: list[Path], test_fraction: float,
           min_sentences: int, heldout_fraction: float, seed: int) -> FederatedDataset:
    dropped = {
        "clients_before": len(items),
        "items_before": sum(len(v) for v in items.values()),
        "rules": {},
        "clients": {},
        "items": {},
    }
    return build_federated(
        name,
        items,
        test_fraction=test_fraction,
        min_items=min_sentences,
        heldout_fraction=heldout_fraction,
        seed=seed,
        dropped=dropped,
        info={"unit": "sentence", "files": [str(f) for f in files]},
    )
