"""models/lr_schedule.py: the server learning-rate schedules' math."""
from __future__ import annotations

import math

import pytest

from models.lr_schedule import LrSchedule, schedule_errors, server_lr_at


def test_constant_is_the_base_rate_every_round():
    assert [server_lr_at(r, 0.7) for r in (1, 2, 100, 10_000)] == [0.7] * 4
    assert LrSchedule().is_constant and LrSchedule().lr_at(5, 0.3) == 0.3


def test_cosine_starts_at_base_ends_near_floor_and_stays_there():
    lr = lambda r: server_lr_at(r, 1.0, "cosine", total_rounds=10, min_lr_fraction=0.1)  # noqa: E731
    assert lr(1) == 1.0
    # p = (r - 1) / 10: round 6 is half way, floor + (base - floor) / 2
    assert lr(6) == pytest.approx(0.55)
    assert lr(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr(11) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    rates = [lr(r) for r in range(1, 12)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_cosine_floor_zero_and_the_closed_form():
    for r in range(1, 21):
        want = 0.5 * 2.0 * (1 + math.cos(math.pi * (r - 1) / 20))
        assert server_lr_at(r, 2.0, "cosine", total_rounds=20, min_lr_fraction=0.0) == pytest.approx(want)
    assert server_lr_at(21, 2.0, "cosine", total_rounds=20, min_lr_fraction=0.0) == pytest.approx(0.0, abs=1e-15)


def test_linear_warmup_then_cosine_over_the_remaining_rounds():
    lr = lambda r: server_lr_at(r, 1.0, "cosine", total_rounds=24, warmup_rounds=4, min_lr_fraction=0.0)  # noqa: E731
    assert [lr(r) for r in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(5) == 1.0  # the decay starts after the warmup
    assert lr(15) == pytest.approx(0.5)  # p = (15 - 1 - 4) / 20
    assert lr(25) == pytest.approx(0.0, abs=1e-15)


def test_step_multiplies_by_gamma_every_n_rounds():
    got = [server_lr_at(r, 1.0, "step", step_rounds=3, gamma=0.5) for r in range(1, 10)]
    assert got == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    warm = [server_lr_at(r, 1.0, "step", warmup_rounds=2, step_rounds=2, gamma=0.1) for r in range(1, 8)]
    assert warm == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])


def test_inverse_sqrt_is_continuous_at_the_end_of_warmup():
    assert [server_lr_at(r, 1.0, "inverse_sqrt") for r in (1, 4, 100)] == pytest.approx([1.0, 0.5, 0.1])
    lr = lambda r: server_lr_at(r, 2.0, "inverse_sqrt", warmup_rounds=4)  # noqa: E731
    assert [lr(r) for r in (1, 4)] == [0.5, 2.0]
    assert lr(16) == pytest.approx(2.0 * math.sqrt(4 / 16)) and lr(5) < lr(4)


def test_constant_with_warmup():
    assert [server_lr_at(r, 1.0, "constant", warmup_rounds=2) for r in (1, 2, 3, 50)] == [0.5, 1.0, 1.0, 1.0]
    assert not LrSchedule(warmup_rounds=2).is_constant


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(schedule="linear"), "must be one of"),
    (dict(schedule="cosine"), "needs its length"),
    (dict(schedule="cosine", total_rounds=5, warmup_rounds=5), "must exceed its warmup"),
    (dict(schedule="step"), "step rounds"),
    (dict(schedule="step", step_rounds=0), "step rounds"),
    (dict(schedule="constant", warmup_rounds=-1), "warmup"),
    (dict(schedule="cosine", total_rounds=10, min_lr_fraction=1.5), "min fraction"),
    (dict(schedule="step", step_rounds=2, gamma=0.0), "gamma"),
])
def test_bad_settings_are_refused(kwargs, fragment):
    schedule = kwargs.pop("schedule")
    assert any(fragment in e for e in schedule_errors(schedule, **kwargs))
    with pytest.raises(ValueError, match=fragment):
        server_lr_at(1, 1.0, schedule, **kwargs)
    with pytest.raises(ValueError, match=fragment):
        LrSchedule(schedule, **kwargs)


def test_rounds_count_from_one():
    with pytest.raises(ValueError, match="round_num"):
        server_lr_at(0, 1.0)


def test_describe_names_the_schedule():
    assert LrSchedule("cosine", 600, 20).describe(1.0) == "cosine from 1 to 0.1 over 600 rounds, 20 warmup rounds"
    assert LrSchedule().describe(0.5) == "constant 0.5"
    assert "every 10 rounds" in LrSchedule("step", step_rounds=10).describe(1.0)


def test_decay_at_is_the_schedule_without_its_warmup() -> None:
    s = LrSchedule("cosine", 100, 10, 0.1)
    assert [s.decay_at(r, 0.5) for r in (1, 5, 10, 11)] == [0.5, 0.5, 0.5, 0.5]
    assert s.lr_at(1, 0.5) == pytest.approx(0.05)  # the server's warmup ramp, which the clients skip
    for r in (12, 50, 100, 150):
        assert s.decay_at(r, 0.5) == s.lr_at(r, 0.5) < 0.5
    assert s.decay_at(150, 0.5) == pytest.approx(0.05)  # past the schedule: the floor
    assert LrSchedule().decay_at(7, 0.3) == 0.3
