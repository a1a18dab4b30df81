"""Federated text datasets: one ClientData per user, grouped in a FederatedDataset."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Iterable, Sequence

# Donors: training users whose text the operator may use centrally (docs/donors.md). 10%: the
# same share as the held-out users, so the federated population keeps 90% of the training users
# (DP noise and sampling rates barely move), while the donors' text (89 of chitchat's 886 training
# users, 16% of its training words: 357k of 2.2M) is enough for a 5,000-10,000-word vocabulary
# and a pre-trained start.
DEFAULT_DONOR_FRACTION = 0.1
DONOR_SALT = "donors"
POPULATIONS = ("all", "donors", "federated")


@dataclass
class ClientData:
    """One user's text: sentences or messages as raw strings, oldest first.

    `test` is the user's most recent text (the tail of the time order); `train` is what
    came before it, minus any item that repeats a test item (see models/data/split.py).
    """

    client_id: str
    train: list[str]
    test: list[str]

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


@dataclass
class FederatedDataset:
    """Clients plus which of them may be trained on.

    train_ids: clients used in federated training (their `train` split is trained on,
    their `test` split measures seen-user accuracy). heldout_ids: never trained on, for
    unseen-user evaluation (both their splits may be used). The two lists are disjoint
    and sorted. `dropped` reports what the loader's filters removed and why, `info` the
    loader's parameters.

    donor_ids: the donors, a seeded `donor_fraction` of train_ids (choose_donors; computed
    when not given): users whose text the operator may use centrally (vocabulary,
    pre-training, n-gram baselines). federated_ids: the other training clients, whose text
    reaches a model only through federated rounds. See docs/donors.md.
    """

    name: str
    clients: dict[str, ClientData]
    # Keyword-only from here: train_ids and heldout_ids are both list[str], and a
    # positional swap would silently train on the held-out users.
    _: KW_ONLY
    train_ids: list[str]
    heldout_ids: list[str]
    dropped: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    donor_fraction: float = DEFAULT_DONOR_FRACTION
    donor_ids: list[str] | None = None  # None: choose_donors(train_ids, donor_fraction, seed)

    def __post_init__(self) -> None:
        overlap = set(self.train_ids) & set(self.heldout_ids)
        if overlap:
            raise ValueError(f"clients both trained on and held out: {sorted(overlap)[:5]}")
        missing = [cid for cid in (*self.train_ids, *self.heldout_ids) if cid not in self.clients]
        if missing:
            raise ValueError(f"ids without client data: {missing[:5]}")
        if self.donor_ids is None:
            self.donor_ids = choose_donors(self.train_ids, self.donor_fraction, self.seed)
        else:
            not_train = sorted(set(self.donor_ids) - set(self.train_ids))
            if not_train:
                raise ValueError(f"donors must be training clients: {not_train[:5]}")
            self.donor_ids = sorted(self.donor_ids)

    @property
    def federated_ids(self) -> list[str]:
        """Training clients that are not donors (sorted): their text is used only by federated rounds."""
        donors = set(self.donor_ids or ())
        return [cid for cid in self.train_ids if cid not in donors]

    def population_ids(self, population: str = "all") -> list[str]:
        """The training clients of a population: "all" (train_ids), "donors" or "federated"."""
        if population == "all":
            return list(self.train_ids)
        if population == "donors":
            return list(self.donor_ids or ())
        if population == "federated":
            return self.federated_ids
        raise ValueError(f"unknown population {population!r}: expected one of {POPULATIONS}")

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client_id: str) -> ClientData:
        return self.clients[client_id]

    def train_clients(self) -> list[ClientData]:
        return [self.clients[cid] for cid in self.train_ids]

    def heldout_clients(self) -> list[ClientData]:
        return [self.clients[cid] for cid in self.heldout_ids]

    def all_train_sentences(self, ids: Iterable[str] | None = None) -> list[str]:
        """Train-split items of `ids` (default: the training clients), client by client."""
        ids = self.train_ids if ids is None else ids
        return [s for cid in ids for s in self.clients[cid].train]

    def all_test_sentences(self, ids: Iterable[str] | None = None) -> list[str]:
        """Test-split items of `ids` (default: the training clients, i.e. seen users)."""
        ids = self.train_ids if ids is None else ids
        return [s for cid in ids for s in self.clients[cid].test]

    def heldout_sentences(self) -> list[str]:
        """Everything the held-out (unseen) clients wrote: both splits, since none was trained on."""
        return [s for cid in self.heldout_ids for s in (*self.clients[cid].train, *self.clients[cid].test)]

    def subset(
        self,
        n_clients: int | None = None,
        ids: Sequence[str] | None = None,
        n_heldout: int | None = None,
    ) -> "FederatedDataset":
        """A smaller dataset with the same splits and held-out assignment.

        ids: keep exactly these clients (each stays train or held-out as before).
        n_clients / n_heldout: keep that many training / held-out clients, picked by a
        seeded hash of the id (so the same seed gives the same subset, and a subset of
        n is contained in the subset of n+1). None keeps all of that kind.
        """
        if ids is not None:
            keep = set(ids)
            unknown = keep - self.clients.keys()
            if unknown:
                raise KeyError(f"unknown client ids: {sorted(unknown)[:5]}")
            train_ids = [cid for cid in self.train_ids if cid in keep]
            heldout_ids = [cid for cid in self.heldout_ids if cid in keep]
        else:
            train_ids = sorted(seeded_order(self.train_ids, self.seed, "subset")[:n_clients])
            heldout_ids = sorted(seeded_order(self.heldout_ids, self.seed, "subset")[:n_heldout])
        kept = [*train_ids, *heldout_ids]
        kept_train = set(train_ids)
        return FederatedDataset(
            name=self.name,
            clients={cid: self.clients[cid] for cid in sorted(kept)},
            train_ids=train_ids,
            heldout_ids=heldout_ids,
            dropped=copy.deepcopy(self.dropped),
            seed=self.seed,
            info={**self.info, "subset_of": len(self.clients)},
            donor_fraction=self.donor_fraction,
            # a client keeps its donor status in every subset (not re-drawn among the subset)
            donor_ids=[cid for cid in (self.donor_ids or ()) if cid in kept_train],
        )


def choose_donors(train_ids: Sequence[str], fraction: float = DEFAULT_DONOR_FRACTION, seed: int = 0) -> list[str]:
    """The donors: the first round(fraction * n) training ids in the seeded order (salt "donors"), sorted.

    The same machinery as the held-out choice (split.choose_heldout, salt "heldout"): the same
    (ids, fraction, seed) gives the same donors in every process, whatever the ids' order.
    """
    n = int(len(train_ids) * fraction + 0.5) if fraction > 0 else 0
    return sorted(seeded_order(train_ids, seed, DONOR_SALT)[:n])


def seeded_order(ids: Iterable[str], seed: int, salt: str = "") -> list[str]:
    """ids ordered by sha256(seed, salt, id): a permutation that is the same in every
    process and numpy version (unlike hash() or a set's order)."""
    def key(cid: str) -> bytes:
        return hashlib.sha256(f"{seed}\x00{salt}\x00{cid}".encode("utf-8")).digest()

    return sorted(ids, key=lambda cid: (key(cid), cid))
