"""The Chit Chat Challenge corpus as a federated dataset: one client per sender.

Read straight from the `chitchat_dataset` package's dataset.json (7,168 conversations,
258,145 messages, 1,315 senders, ~2.5M whitespace words); ~1 s, nothing cached.

Filters (measured on the real data; numbers from dataset.json of chitchat-dataset 0.9.0):
  * Junk senders. Two senders are test/spam accounts: one sent ~1,150 messages like
    "a a a a a a a" plus lone "a"s (25% of its 5,283 messages), another ~950 lone
    letters "a", "f", "d" (37% of 2,547). A message counts as junk if it is empty, is
    a lone letter, or repeats one word (>= 4 words, the most common >= 80% of them).
    A sender is dropped when >= 20% of its messages are junk. Exactly those two are
    dropped (7,830 messages); the next highest junk share among senders with >= 5
    messages is 16% (a sender with 4 empty messages in 25), then 14%, and most
    senders have none, so the threshold sits in a wide gap.
  * Junk messages of kept senders: empty messages (33) and repeated-word messages
    (39, e.g. "ink ink ink ...", "ha ha ha ha") are removed. Lone letters are kept
    for kept senders: "k" and "I" are real chat.
  * Messages that are not junk are kept as typed, including "?" and ":)" (276 and 56
    of them): they are what people send. Consecutive exact duplicates are kept: only
    856 of 250k messages (0.3%) repeat the sender's previous message, mostly "a", "k",
    "hi": too few to matter and real behaviour (double-sending).
  * Then the shared rules of models/data/split.py: senders with fewer than
    `min_messages` (default 5) messages are dropped (329 senders); time split 80/20;
    no train message equal to one of the sender's test messages; 10% held out.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from models.data.split import DEFAULT_HELDOUT_FRACTION, DEFAULT_TEST_FRACTION, build_federated
from models.data.types import FederatedDataset

JUNK_SENDER_FRACTION = 0.2
MIN_MESSAGES = 5
_WORD_RE = re.compile(r"\w+")
# Message issues that remove the message from a kept sender, and the ones that only
# count toward a sender's junk share.
REMOVED_ISSUES = ("empty", "repeated_word")
JUNK_ISSUES = ("empty", "repeated_word", "lone_letter")


def dataset_path() -> Path:
    """dataset.json inside the installed chitchat_dataset package (not imported, only located)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package chitchat_dataset is not installed (pip install chitchat-dataset)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def message_issue(text: str) -> str | None:
    """Why a message is junk ("empty", "repeated_word", "lone_letter"), or None if it is fine."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if len(stripped) == 1 and stripped.isalpha():
        return "lone_letter"
    words = _WORD_RE.findall(stripped.casefold())
    n = len(words)
    # A word making up >= 80% leaves room for at most n - ceil(0.8 n) other distinct words;
    # checking the distinct count first skips the Counter for almost every message.
    if n >= 4 and len(set(words)) <= n - math.ceil(0.8 * n) + 1:
        if Counter(words).most_common(1)[0][1] >= 0.8 * n:
            return "repeated_word"
    return None


def read_messages(path: str | Path | None = None) -> dict[str, list[str]]:
    """Every sender's messages in time order.

    Sorted by (timestamp, conversation id, turn index, index in turn): timestamps are
    whole seconds and often tie within a turn, and this key does not depend on the
    JSON file's order.
    """
    with open(path or dataset_path(), encoding="utf-8") as f:
        conversations = json.load(f)
    keyed: dict[str, list[tuple[str, str, int, int, str]]] = defaultdict(list)
    for conv_id, conv in conversations.items():
        for turn_index, turn in enumerate(conv["messages"]):
            for msg_index, msg in enumerate(turn):
                keyed[msg["sender"]].append((msg["timestamp"], conv_id, turn_index, msg_index, msg["text"]))
    return {sender: [m[-1] for m in sorted(msgs)] for sender, msgs in keyed.items()}


def load_chitchat(
    path: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    min_messages: int = MIN_MESSAGES,
    junk_sender_fraction: float = JUNK_SENDER_FRACTION,
) -> FederatedDataset:
    """Chit Chat as a FederatedDataset of messages (raw text), filtered as described above."""
    by_sender = read_messages(path)
    clients: dict[str, list[str]] = {}
    junk_senders: list[dict[str, Any]] = []
    removed: Counter[str] = Counter()
    for sender in sorted(by_sender):
        messages = by_sender[sender]
        issues = [message_issue(m) for m in messages]
        junk = sum(1 for issue in issues if issue in JUNK_ISSUES)
        share = junk / len(messages)
        if share >= junk_sender_fraction and len(messages) >= min_messages:
            junk_senders.append({"id": sender, "messages": len(messages), "junk_fraction": round(share, 4),
                                 "issues": dict(Counter(i for i in issues if i))})
            removed["junk_sender"] += len(messages)
            continue
        removed.update(issue for issue in issues if issue in REMOVED_ISSUES)
        clients[sender] = [m for m, issue in zip(messages, issues) if issue not in REMOVED_ISSUES]

    junk_senders.sort(key=lambda s: (-s["messages"], s["id"]))
    dropped: dict[str, Any] = {
        "clients_before": len(by_sender),
        "items_before": sum(len(m) for m in by_sender.values()),
        "rules": {
            "junk_sender": (
                f"sender with >= {min_messages} messages of which >= {junk_sender_fraction:.0%} are junk "
                "(empty, a lone letter, or >= 4 words with one word >= 80% of them)"
            ),
            "empty": "message of whitespace only",
            "repeated_word": "message of >= 4 words in which one word makes up >= 80% (e.g. 'a a a a a')",
        },
        "clients": {"junk_sender": len(junk_senders)},
        "items": dict(removed),
        "junk_senders": junk_senders,
    }
    return build_federated(
        "chitchat",
        clients,
        test_fraction=test_fraction,
        min_items=min_messages,
        heldout_fraction=heldout_fraction,
        seed=seed,
        dropped=dropped,
        info={"unit": "message", "source": str(path or dataset_path())},
    )
