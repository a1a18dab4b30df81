"""Seeded client sampling: each round's cohort depends only on (seed, round).

That makes a resumed run sample exactly the clients the uninterrupted run would, and
every client is equally likely in every round, independently across rounds, which is
what the privacy accountant assumes (Poisson sampling is its exact model).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Salts keep the streams for sampling and batch order independent of each other.
_SAMPLE_SALT = 0x5A3D
_ORDER_SALT = 0x0B7C


def round_rng(seed: int, round_num: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_num), *[int(e) for e in extra]])


def sample_clients(
    client_ids: Sequence[str], round_num: int, seed: int, clients_per_round: int, mode: str = "uniform"
) -> list[str]:
    """The cohort of round `round_num` (1-based), in the order of `client_ids`.

    uniform: exactly min(m, N) distinct clients, uniformly without replacement.
    poisson: each client independently with probability m / N (the cohort size varies,
    and may even be 0 for small populations).
    """
    n = len(client_ids)
    if n == 0:
        return []
    rng = round_rng(seed, round_num, _SAMPLE_SALT)
    if mode == "uniform":
        picked = np.sort(rng.choice(n, size=min(clients_per_round, n), replace=False))
    elif mode == "poisson":
        picked = np.flatnonzero(rng.random(n) < sampling_probability(clients_per_round, n))
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return [client_ids[i] for i in picked]


def sampling_probability(clients_per_round: int, population: int) -> float:
    return min(1.0, clients_per_round / max(1, population))


def example_order(num_examples: int, seed: int, round_num: int, client_index: int, epoch: int) -> np.ndarray:
    """The permutation of a client's examples in one local epoch of one round."""
    return round_rng(seed, round_num, _ORDER_SALT, client_index, epoch).permutation(num_examples)
