"""Per-client train/test splits and the held-out client choice, shared by all loaders.

The rules (the same for every dataset):
  * Time split: a client's items (messages or sentences, oldest first) are cut by
    position: the last `test_fraction` (rounded, at least 1) are its test split, the
    earlier ones its train split. Nothing is shuffled, so the test split is the
    user's "future", as it is for a keyboard.
  * No-leakage guarantee: after the cut, any train item whose `dedupe_key` equals the
    `dedupe_key` of one of the same client's test items is removed from train. So no
    client's test item appears (case-folded, whitespace-collapsed) in its own train
    split. Chat repeats itself ("lol", "hi"): on chitchat this removes ~5% of train
    messages but under 1% of train words. Other clients may still have written the
    same string; that is not leakage of this user's future.
  * Clients with fewer than `min_items` items (after the loader's filters) are dropped;
    so are clients whose train split is empty after de-duplication.
  * Held-out clients: `heldout_fraction` of the remaining clients (rounded), chosen by a
    seeded sha256 ranking of their ids (see types.seeded_order): the same seed gives the
    same set in every process; a different seed gives a different set.
  * Donors: `donor_fraction` of the training (not held-out) clients, chosen the same way
    with another salt (types.choose_donors); the rest are the federated population.
    See models/data/donors.py and docs/donors.md.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from models.data.types import DEFAULT_DONOR_FRACTION, ClientData, FederatedDataset, choose_donors, seeded_order  # noqa: F401

DEFAULT_TEST_FRACTION = 0.2
DEFAULT_HELDOUT_FRACTION = 0.1


def dedupe_key(text: str) -> str:
    """What counts as "the same item" for the no-leakage rule: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def num_test_items(n: int, test_fraction: float = DEFAULT_TEST_FRACTION) -> int:
    """How many of a client's n items go to test: round(n * fraction), at least 1 when n >= 2."""
    if n < 2 or test_fraction <= 0:
        return 0
    return min(n - 1, max(1, int(n * test_fraction + 0.5)))


def split_by_time(items: Sequence[str], test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[list[str], list[str], int]:
    """(train, test, n_removed): the time split plus the no-leakage de-duplication of train."""
    n_test = num_test_items(len(items), test_fraction)
    cut = len(items) - n_test
    test = list(items[cut:])
    test_keys = {dedupe_key(t) for t in test}
    train = [t for t in items[:cut] if dedupe_key(t) not in test_keys]
    return train, test, cut - len(train)


def choose_heldout(ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The held-out clients: the first round(fraction * n) ids in the seeded order, sorted."""
    n = int(len(ids) * fraction + 0.5) if fraction > 0 else 0
    return sorted(seeded_order(ids, seed, "heldout")[:n])


def build_federated(
    name: str,
    items_by_client: Mapping[str, Sequence[str]],
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    min_items: int = 5,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = 0,
    dropped: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    donor_fraction: float = DEFAULT_DONOR_FRACTION,
) -> FederatedDataset:
    """Apply the split rules above to already-filtered, time-ordered items per client.

    `dropped` is the loader's own report (rules, client and item counts); this adds the
    min-items and de-duplication counts to it under the same keys.
    """
    report = _empty_report() if dropped is None else dropped
    for key in ("rules", "clients", "items"):
        report.setdefault(key, {})
    report["rules"].setdefault("too_few_items", f"client has fewer than {min_items} items after filtering")
    report["rules"].setdefault(
        "train_copy_of_test",
        "train item equal (case-folded, whitespace-collapsed) to one of the same client's test items",
    )
    report["rules"].setdefault("empty_train", "client's train split is empty after removing copies of test items")
    client_counts: Counter[str] = Counter(report["clients"])
    item_counts: Counter[str] = Counter(report["items"])

    clients: dict[str, ClientData] = {}
    for cid in sorted(items_by_client):
        items = list(items_by_client[cid])
        if len(items) < min_items:
            client_counts["too_few_items"] += 1
            item_counts["too_few_items"] += len(items)
            continue
        train, test, n_removed = split_by_time(items, test_fraction)
        if not train:
            client_counts["empty_train"] += 1
            item_counts["empty_train"] += len(items)
            continue
        item_counts["train_copy_of_test"] += n_removed
        clients[cid] = ClientData(cid, train, test)

    ids = sorted(clients)
    heldout = choose_heldout(ids, heldout_fraction, seed)
    heldout_set = set(heldout)
    report["clients"] = {k: client_counts[k] for k in sorted(client_counts)}
    report["items"] = {k: item_counts[k] for k in sorted(item_counts)}
    return FederatedDataset(
        name=name,
        clients=clients,
        train_ids=[cid for cid in ids if cid not in heldout_set],
        heldout_ids=heldout,
        dropped=report,
        seed=seed,
        donor_fraction=donor_fraction,
        info={
            "test_fraction": test_fraction,
            "min_items": min_items,
            "heldout_fraction": heldout_fraction,
            **(info or {}),
        },
    )


def _empty_report() -> dict[str, Any]:
    return {"clients_before": None, "rules": {}, "clients": {}, "items": {}}
