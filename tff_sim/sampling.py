"""Seeded client sampling: each round's cohort depends only on (seed, round).

That makes a resumed run sample exactly the clients the uninterrupted run would, and
every client is equally likely in every round, independently across rounds, which is
what the privacy accountant assumes (Poisson sampling is its exact model).

DP-FTRL needs no sampling, only a participation limit, and its two rules are enforced here
exactly as tff_sim/privacy.py accounts them (K = rounds_per_epoch = population // m):

    shuffled  epoch e (rounds eK+1 .. eK+K) takes the clients in a fresh seeded permutation,
              m per round: each client at most once per epoch (the tree restarts every epoch;
              the N - K*m clients left over sit the epoch out)
    cyclic    one seeded permutation, repeated: client i's rounds are exactly K apart, so at
              least K - 1 rounds between two of them, and at most ceil(rounds / K) of them
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Salts keep the streams for sampling and batch order independent of each other.
_SAMPLE_SALT = 0x5A3D
_ORDER_SALT = 0x0B7C
_EPOCH_SALT = 0x3E90
FTRL_MODES = ("shuffled", "cyclic")


def round_rng(seed: int, round_num: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_num), *[int(e) for e in extra]])


def sample_clients(
    client_ids: Sequence[str], round_num: int, seed: int, clients_per_round: int, mode: str = "uniform"
) -> list[str]:
    """The cohort of round `round_num` (1-based), in the order of `client_ids`.

    uniform: exactly min(m, N) distinct clients, uniformly without replacement.
    poisson: each client independently with probability m / N (the cohort size varies,
    and may even be 0 for small populations).
    shuffled / cyclic: DP-FTRL's participation rules (module doc), exactly m clients.
    """
    n = len(client_ids)
    if n == 0:
        return []
    if mode in FTRL_MODES:
        return [client_ids[i] for i in epoch_cohort(n, round_num, seed, clients_per_round, mode)]
    rng = round_rng(seed, round_num, _SAMPLE_SALT)
    if mode == "uniform":
        picked = np.sort(rng.choice(n, size=min(clients_per_round, n), replace=False))
    elif mode == "poisson":
        picked = np.flatnonzero(rng.random(n) < sampling_probability(clients_per_round, n))
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return [client_ids[i] for i in picked]


def rounds_per_epoch(clients_per_round: int, population: int) -> int:
    """K = N // m rounds make an epoch of DP-FTRL's participation rules (each client at most once)."""
    if not 0 < clients_per_round <= population:
        raise ValueError(f"DP-FTRL needs 0 < clients_per_round <= population, got {clients_per_round} of {population}")
    return population // clients_per_round


def epoch_cohort(population: int, round_num: int, seed: int, clients_per_round: int, mode: str) -> np.ndarray:
    """Sorted client indices of round `round_num` (1-based) under the shuffled or cyclic rule."""
    if mode not in FTRL_MODES:
        raise ValueError(f"mode must be one of {FTRL_MODES}, got {mode!r}")
    k = rounds_per_epoch(clients_per_round, population)
    epoch, slot = divmod(round_num - 1, k)
    order = round_rng(seed, epoch if mode == "shuffled" else 0, _EPOCH_SALT).permutation(population)
    return np.sort(order[slot * clients_per_round:(slot + 1) * clients_per_round])


def sampling_probability(clients_per_round: int, population: int) -> float:
    return min(1.0, clients_per_round / max(1, population))


def example_order(num_examples: int, seed: int, round_num: int, client_index: int, epoch: int) -> np.ndarray:
    """The permutation of a client's examples in one local epoch of one round."""
    return round_rng(seed, round_num, _ORDER_SALT, client_index, epoch).permutation(num_examples)
