"""Randomized response (Warner 1965), the two-coin survey: yes/no telemetry with local DP (pure Python).

A device answers a yes/no question ("was a suggestion accepted in this session?") like this:
flip the first coin; with probability p_first it answers truthfully; otherwise it flips the
second coin and answers "yes" with probability p_second. Fair coins (0.5, 0.5) are the classic
survey: the truth half the time, a random answer otherwise.

    P[yes | true] = p_first + (1 - p_first) p_second        P[yes | false] = (1 - p_first) p_second

So E[yes_rate] = p_first * rate + (1 - p_first) p_second and the unbiased estimator is

    rate_hat = (yes_rate - (1 - p_first) p_second) / p_first        (= 2 yes_rate - 1/2 for fair coins)

with standard error sqrt(yes_rate (1 - yes_rate) / n) / p_first (binomial), and a normal-approximation
confidence interval rate_hat +- z * se (clipped to [0, 1] for display, the point estimate is not).
Each answer is epsilon-locally-DP with

    epsilon = ln max(P[yes|true] / P[yes|false], P[no|false] / P[no|true])   (= ln 3 for fair coins)

and k answers from one device about facts that may be correlated compose to k * epsilon.
"""
from __future__ import annotations

import dataclasses
import math
import random
from statistics import NormalDist
from typing import Any


@dataclasses.dataclass(frozen=True)
class Coins:
    p_first: float = 0.5  # probability of answering truthfully
    p_second: float = 0.5  # probability that the random answer is "yes"

    def __post_init__(self) -> None:
        if not 0.0 < self.p_first < 1.0:
            raise ValueError("p_first must be in (0, 1) (1 would send the truth, 0 carries no information)")
        if not 0.0 < self.p_second < 1.0:
            raise ValueError("p_second must be in (0, 1)")

    @property
    def p_yes_true(self) -> float:
        return self.p_first + (1.0 - self.p_first) * self.p_second

    @property
    def p_yes_false(self) -> float:
        return (1.0 - self.p_first) * self.p_second

    def to_dict(self) -> dict[str, float]:
        return {"p_first": self.p_first, "p_second": self.p_second}


def respond(truth: bool, coins: Coins = Coins(), rng: random.Random | None = None) -> bool:
    """The randomized answer a device sends instead of `truth`."""
    rng = rng or random.SystemRandom()
    if rng.random() < coins.p_first:
        return bool(truth)
    return rng.random() < coins.p_second


def local_epsilon(coins: Coins = Coins()) -> float:
    a, b = coins.p_yes_true, coins.p_yes_false
    return math.log(max(a / b, (1.0 - b) / (1.0 - a)))


def estimate(yes: int, n: int, coins: Coins = Coins(), confidence: float = 0.95) -> dict[str, Any]:
    """De-biased rate with its standard error and confidence interval, from `yes` of `n` answers."""
    if n < 0 or not 0 <= yes <= max(n, 0):
        raise ValueError("need 0 <= yes <= n")
    out: dict[str, Any] = {"reports": n, "yes": yes, "confidence": confidence,
                           "local_epsilon": local_epsilon(coins), **coins.to_dict()}
    if n == 0:
        return {**out, "yes_rate": None, "rate": None, "stderr": None, "ci_low": None, "ci_high": None}
    yes_rate = yes / n
    rate = (yes_rate - coins.p_yes_false) / coins.p_first
    se = math.sqrt(yes_rate * (1.0 - yes_rate) / n) / coins.p_first
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return {**out, "yes_rate": yes_rate, "rate": rate, "stderr": se,
            "ci_low": max(0.0, rate - z * se), "ci_high": min(1.0, rate + z * se)}


__all__ = ["Coins", "respond", "local_epsilon", "estimate"]
