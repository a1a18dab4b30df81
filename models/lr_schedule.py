"""The server learning-rate schedule, shared by tff_sim and the aggregation server. Pure, no TensorFlow.

Rounds are numbered from 1 (round r is the r-th server step); `server_lr_at(r, ...)` is the learning
rate that step uses. Because the rate is a function of the round number alone, a resumed run (tff_sim's
checkpoint, the server's restart) recomputes it: nothing about the schedule has to be saved.

    constant       base                                                       (the default: today's behaviour)
    cosine         floor + (base - floor) (1 + cos(pi p)) / 2,  floor = min_lr_fraction * base,
                   p = (r - 1 - warmup) / (total - warmup) clamped to [0, 1]  (PyTorch's CosineAnnealingLR)
    step           base * gamma ** floor((r - 1 - warmup) / step_rounds)
    inverse_sqrt   base * sqrt(max(warmup, 1) / r)                            (fairseq's inverse_sqrt)

With warmup_rounds W > 0 the first W rounds rise linearly, base * r / W (round W uses base); the decay
starts after them, so round W + 1 also uses base (inverse_sqrt: base * sqrt(W / (W + 1))). With cosine the
last round (r = total) is one step short of the floor, as in PyTorch; rounds past `total_rounds` stay at
the floor, so a run extended beyond its schedule keeps learning at the floor rate.

Why the cosine floor defaults to 0.1 of the base rate, not 0: a floor of 10% is the usual choice for
cosine decay in language-model training (e.g. Hoffmann et al. 2022); with 0 the last rounds of a schedule
barely move the model (their clients' work is nearly wasted), and a run extended past its schedule (tff_sim
allows raising --rounds) would freeze at lr 0 instead of going on at the floor. min_lr_fraction 0 is there
for whoever wants the textbook cosine.

The clients' learning rate may decay with the server's (`decay_at`, tff_sim's --client-lr-decay, the
server's client_lr_decay): the same decay applied to the client lr, without the warmup ramp. Why decay it:
a server step averages client deltas, each K local SGD steps at the client lr; lowering only the server lr
shrinks the step but keeps every client's drift towards its own text, which only a smaller client lr
reduces (the local steps' noise, as in central training's annealing). Why no warmup: warmup protects the
server optimizer's momentum from the first rounds' large pseudo-gradients; a client starts fresh each round.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

SCHEDULES = ("constant", "cosine", "step", "inverse_sqrt")
DEFAULT_MIN_LR_FRACTION = 0.1
DEFAULT_GAMMA = 0.5


def schedule_errors(schedule: str, total_rounds: int | None = None, warmup_rounds: int = 0,
                    min_lr_fraction: float = DEFAULT_MIN_LR_FRACTION, step_rounds: int | None = None,
                    gamma: float = DEFAULT_GAMMA) -> list[str]:
    """What is wrong with these schedule settings (empty when nothing is)."""
    out = []
    if schedule not in SCHEDULES:
        return [f"server lr schedule must be one of {SCHEDULES}, got {schedule!r}"]
    if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 0:
        out.append(f"server lr warmup rounds must be an integer >= 0 (server_lr_warmup_rounds), got {warmup_rounds!r}")
    if not (isinstance(min_lr_fraction, (int, float)) and 0.0 <= min_lr_fraction <= 1.0):
        out.append(f"server lr min fraction must be in [0, 1] (server_lr_min_fraction), got {min_lr_fraction!r}")
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        out.append(f"server lr gamma must be in (0, 1] (server_lr_gamma), got {gamma!r}")
    if schedule == "cosine":
        if total_rounds is None or isinstance(total_rounds, bool) or not isinstance(total_rounds, int):
            out.append(f"the cosine schedule needs its length in rounds (server_lr_total_rounds), got {total_rounds!r}")
        elif isinstance(warmup_rounds, int) and total_rounds <= warmup_rounds:
            out.append(f"the cosine schedule's length ({total_rounds} rounds) must exceed its warmup ({warmup_rounds})")
    if schedule == "step" and (step_rounds is None or isinstance(step_rounds, bool)
                               or not isinstance(step_rounds, int) or step_rounds < 1):
        out.append(f"the step schedule needs step rounds >= 1 (server_lr_step_rounds: multiply by gamma every N "
                   f"rounds), got {step_rounds!r}")
    return out


def server_lr_at(round_num: int, base_lr: float, schedule: str = "constant", total_rounds: int | None = None,
                 warmup_rounds: int = 0, min_lr_fraction: float = DEFAULT_MIN_LR_FRACTION,
                 step_rounds: int | None = None, gamma: float = DEFAULT_GAMMA) -> float:
    """The server learning rate of round `round_num` (1-based) under `schedule` (module docstring)."""
    problems = schedule_errors(schedule, total_rounds, warmup_rounds, min_lr_fraction, step_rounds, gamma)
    if problems:
        raise ValueError("; ".join(problems))
    if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 1:
        raise ValueError(f"round_num must be an integer >= 1 (rounds count from 1), got {round_num!r}")
    base = float(base_lr)
    if warmup_rounds and round_num <= warmup_rounds:
        return base * round_num / warmup_rounds
    if schedule == "constant":
        return base
    decayed = round_num - 1 - warmup_rounds  # rounds of decay already behind this one: 0 right after warmup
    if schedule == "cosine":
        assert total_rounds is not None  # schedule_errors checked it
        progress = min(1.0, decayed / (total_rounds - warmup_rounds))
        floor = min_lr_fraction * base
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        assert step_rounds is not None
        return base * gamma ** (decayed // step_rounds)
    return base * math.sqrt(max(warmup_rounds, 1) / round_num)  # inverse_sqrt: continuous at the warmup's end


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    """A schedule's settings; `lr_at(r, base_lr)` is server_lr_at with them. The default is constant."""

    name: str = "constant"
    total_rounds: int | None = None  # cosine: the rounds it decays over (warmup included)
    warmup_rounds: int = 0
    min_lr_fraction: float = DEFAULT_MIN_LR_FRACTION  # cosine's floor, as a fraction of the base rate
    step_rounds: int | None = None  # step: multiply by gamma every step_rounds rounds
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        problems = self.errors()
        if problems:
            raise ValueError("; ".join(problems))

    def errors(self) -> list[str]:
        return schedule_errors(self.name, self.total_rounds, self.warmup_rounds, self.min_lr_fraction,
                               self.step_rounds, self.gamma)

    @classmethod
    def from_fields(cls, config: Any, total_rounds: int | None = None) -> "LrSchedule":
        """The schedule in a config's fields server_lr_schedule, server_lr_warmup_rounds, server_lr_min_fraction,
        server_lr_total_rounds, server_lr_step_rounds, server_lr_gamma (tff_sim's SimConfig, the server's
        ServerConfig: the same names); `total_rounds` stands in for an unset server_lr_total_rounds."""
        total = config.server_lr_total_rounds if config.server_lr_total_rounds is not None else total_rounds
        return cls(config.server_lr_schedule, total, config.server_lr_warmup_rounds, config.server_lr_min_fraction,
                   config.server_lr_step_rounds, config.server_lr_gamma)

    @property
    def is_constant(self) -> bool:
        """True when every round uses the base rate (no decay, no warmup): nothing to set per round."""
        return self.name == "constant" and not self.warmup_rounds

    def lr_at(self, round_num: int, base_lr: float) -> float:
        return server_lr_at(round_num, base_lr, self.name, self.total_rounds, self.warmup_rounds,
                            self.min_lr_fraction, self.step_rounds, self.gamma)

    def decay_at(self, round_num: int, base_lr: float) -> float:
        """The rate of round `round_num` without the warmup ramp: base_lr through the warmup rounds, then
        lr_at (the clients' decayed learning rate; module docstring)."""
        if self.warmup_rounds and 1 <= round_num <= self.warmup_rounds:
            return float(base_lr)
        return self.lr_at(round_num, base_lr)

    def describe(self, base_lr: float) -> str:
        """One phrase for reports and logs, e.g. "cosine from 1 to 0.1 over 600 rounds, 20 warmup rounds"."""
        if self.name == "constant":
            text = f"constant {base_lr:g}"
        elif self.name == "cosine":
            text = f"cosine from {base_lr:g} to {self.min_lr_fraction * base_lr:g} over {self.total_rounds} rounds"
        elif self.name == "step":
            text = f"step: {base_lr:g} x {self.gamma:g} every {self.step_rounds} rounds"
        else:
            text = f"inverse square root from {base_lr:g}"
        w = self.warmup_rounds
        return text + (f", {w} warmup round{'s' if w != 1 else ''}" if w else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["DEFAULT_GAMMA", "DEFAULT_MIN_LR_FRACTION", "LrSchedule", "SCHEDULES", "schedule_errors", "server_lr_at"]
