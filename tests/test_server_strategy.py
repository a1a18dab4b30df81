"""Strategies and DP mechanisms as wrappers (server/strategy/), without HTTP or a database.

Each mechanism's three duties are checked on its own: the clip bound and device noise it tells devices
and enforces on uploads, the server noise it adds at finalize, and the event it adds to the privacy ledger.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest

from models import dp, wire
from models.config import preset
from server.aggregation import MeanAccumulator
from server.errors import Rejection
from server.round import Round, TrainParams, parse_params
from server.strategy import (CentralDP, DistributedDP, DPStrategy, LocalDP, Robust, RoundContext, SecureSum,
                             StreamingMean, UploadBound, device_view_epsilon, strategy_for)

TINY = preset("tiny")
DIM = TINY.num_parameters()
Z, CLIP, MIN_COUNT = 1.5, 0.8, 9


def params(**overrides: Any) -> TrainParams:
    base = dict(goal=10, min_count=MIN_COUNT, max_admitted=13, deadline_s=60.0, clip_norm=CLIP, noise_multiplier=Z,
                upload_dtypes=("float32",), max_examples_per_update=1000)
    return TrainParams(**{**base, **overrides})


def round_of(p: TrainParams, rid: int = 7, seed: int = 1234) -> Round:
    return Round(id=rid, kind="train", state="aggregating", base_version=3, candidate_version=None, created_at=0.0,
                 deadline=None, closed_at=None, params=p, params_dict={}, seed=seed)


def ctx(open_update=lambda rel: None) -> RoundContext:
    return RoundContext(TINY, DIM, 1 << 30, open_update)


class FakeProtocol:
    """A secure-aggregation service that releases a fixed sum."""

    runs_own_deadlines = True

    def __init__(self, total: np.ndarray) -> None:
        self.total = total
        self.bounds: list[UploadBound] = []

    def task_params(self, rnd: Round, bound: UploadBound) -> dict[str, Any]:
        self.bounds.append(bound)
        return {"protocol": "fake"}

    def result_sum(self, rid: int) -> np.ndarray:
        return self.total

    def admission_open(self, rnd: Round) -> bool:
        return False

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        return device_id == "again"

    def summary(self, rid: int) -> dict[str, Any]:
        return {"fake": rid}


def delta_with_norm(norm: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal(shape).astype(np.float64) for _, shape in TINY.weight_specs()]
    scale = norm / math.sqrt(sum(float(np.sum(t * t)) for t in tensors))
    return [(t * scale).astype(np.float32) for t in tensors]


def upload(norm: float, n: int = 5) -> bytes:
    return wire.encode(delta_with_norm(norm), TINY, kind="delta", model_version=3, metadata={"num_examples": n})


# ---------------------------------------------------------------------- the factory
@pytest.mark.parametrize("dp_mode, aggregator, protocol, outer, inner", [
    ("none", "mean", "none", StreamingMean, None),
    ("none", "median", "none", Robust, None),
    ("central", "mean", "none", CentralDP, StreamingMean),
    ("distributed", "mean", "secagg", DistributedDP, SecureSum),
    ("local", "trimmed_mean", "none", LocalDP, Robust),
    ("central", "mean", "paillier", CentralDP, SecureSum),
])
def test_factory_wraps_the_aggregator_in_the_mechanism(dp_mode, aggregator, protocol, outer, inner) -> None:
    s = strategy_for(params(dp_mode=dp_mode, aggregator=aggregator, secure_aggregation=protocol),
                     {"secagg": FakeProtocol(np.zeros(1)), "paillier": FakeProtocol(np.zeros(1))})
    assert type(s) is outer
    if inner is not None:
        assert type(s.inner) is inner and s.name == s.inner.name  # the outcome names the aggregator
    assert s.mechanism == dp_mode


def test_central_noise_refuses_an_aggregate_that_is_no_sum() -> None:
    with pytest.raises(ValueError, match="sum"):
        CentralDP(Robust("median"))


def test_a_secure_round_needs_its_protocol_service() -> None:
    with pytest.raises(RuntimeError, match="secagg"):
        strategy_for(params(secure_aggregation="secagg"), {})


# ---------------------------------------------------------------------- clip bound and device noise
@pytest.mark.parametrize("dp_mode, stddev", [
    ("none", 0.0), ("central", 0.0), ("distributed", Z * CLIP / math.sqrt(MIN_COUNT)), ("local", Z * CLIP)])
def test_each_mechanism_tells_devices_its_clip_and_noise(dp_mode: str, stddev: float) -> None:
    p = params(dp_mode=dp_mode)
    s = strategy_for(p)
    bound = s.upload_bound(p)
    assert bound == UploadBound(CLIP, pytest.approx(stddev, rel=1e-15), p.norm_sigmas)
    assert stddev == pytest.approx(dp.device_noise_stddev(dp_mode, Z, CLIP, MIN_COUNT), rel=1e-15)
    task = s.configure_train(round_of(p), ctx())
    assert (task["dp_mode"], task["clip_norm"], task["noise_multiplier"]) == (dp_mode, CLIP, Z)
    assert task["noise_stddev"] == pytest.approx(stddev, rel=1e-15)
    assert task["secure_aggregation"] is None and task["upload_url"] == "/v1/rounds/7/update"


def test_no_clip_no_bound() -> None:
    p = params(clip_norm=0.0, noise_multiplier=0.0)
    s = strategy_for(p)
    assert s.upload_bound(p) is None and s.configure_train(round_of(p), ctx())["noise_stddev"] == 0.0
    s.decode_upload(upload(50.0), round_of(p), ctx())  # any norm


@pytest.mark.parametrize("dp_mode", ["none", "central", "distributed", "local"])
def test_the_upload_bound_is_clip_plus_the_mechanisms_noise(dp_mode: str) -> None:
    p = params(dp_mode=dp_mode)
    s, rnd = strategy_for(p), round_of(p)
    limit = s.upload_bound(p).tolerance(DIM)
    assert s.decode_upload(upload(limit * 0.999), rnd, ctx()).norm == pytest.approx(limit * 0.999, rel=1e-6)
    with pytest.raises(Rejection) as info:
        s.decode_upload(upload(limit * 1.001), rnd, ctx())
    assert info.value.reason == "norm_exceeded"
    if dp_mode == "local":  # noisy uploads pass a bound that a clip-only round refuses
        with pytest.raises(Rejection):
            strategy_for(params()).decode_upload(upload(limit * 0.999), rnd, ctx())


def test_dp_rounds_weigh_devices_uniformly() -> None:
    assert strategy_for(params()).weight(params(), 40) == 40.0
    for mode in ("central", "distributed", "local"):
        p = params(dp_mode=mode)
        assert strategy_for(p).weight(p, 40) == 1.0


# ---------------------------------------------------------------------- server noise at finalize
def _state(updates: list[np.ndarray], weights: list[float]) -> MeanAccumulator:
    acc = MeanAccumulator(DIM)
    for u, w in zip(updates, weights):
        acc.add(u, w)
    return acc


def test_central_noise_goes_on_the_sum_seeded_by_the_round() -> None:
    rng = np.random.default_rng(1)
    updates = [rng.standard_normal(DIM).astype(np.float32) for _ in range(3)]
    rows = [{"file": str(i), "weight": 1.0} for i in range(3)]
    p = params(dp_mode="central")
    s, rnd = strategy_for(p), round_of(p, rid=7, seed=1234)
    got = s.finalize(_state(updates, [1, 1, 1]), rows, rnd, ctx())
    noise = np.random.default_rng([1234, 7]).standard_normal(DIM) * (Z * CLIP)
    want = (_state(updates, [1, 1, 1]).sum + noise) / 3.0
    np.testing.assert_array_equal(got, want)
    # a re-run after a crash (state rebuilt from the stored files) releases the very same noisy mean
    again = s.finalize(None, rows, rnd, ctx(lambda rel: updates[int(rel)]))
    np.testing.assert_array_equal(again, got)
    other = s.finalize(_state(updates, [1, 1, 1]), rows, round_of(p, rid=8, seed=1234), ctx())
    assert not np.array_equal(other, got)


@pytest.mark.parametrize("dp_mode", ["none", "distributed", "local"])
def test_only_central_dp_adds_server_noise(dp_mode: str) -> None:
    rng = np.random.default_rng(2)
    updates = [rng.standard_normal(DIM).astype(np.float32) for _ in range(2)]
    rows = [{"file": str(i), "weight": w} for i, w in enumerate((3.0, 1.0))]
    p = params(dp_mode=dp_mode)
    got = strategy_for(p).finalize(_state(updates, [3.0, 1.0]), rows, round_of(p), ctx())
    np.testing.assert_array_equal(got, _state(updates, [3.0, 1.0]).mean())


def test_secure_sum_divides_the_released_sum_and_takes_central_noise() -> None:
    total = np.arange(DIM, dtype=np.float64)
    proto = FakeProtocol(total)
    rows = [{"file": None, "weight": 1.0}] * 4
    p = params(secure_aggregation="secagg")
    plain = strategy_for(p, {"secagg": proto})
    np.testing.assert_array_equal(plain.finalize(None, rows, round_of(p), ctx()), total / 4)
    pc = dataclasses.replace(p, dp_mode="central")
    noisy = strategy_for(pc, {"secagg": proto}).finalize(None, rows, round_of(pc), ctx())
    noise = np.random.default_rng([1234, 7]).standard_normal(DIM) * (Z * CLIP)
    np.testing.assert_array_equal(noisy, (total + noise) / 4)


def test_secure_sum_hands_selection_to_its_protocol() -> None:
    proto = FakeProtocol(np.zeros(DIM))
    p = params(dp_mode="distributed", secure_aggregation="secagg")
    s, rnd = strategy_for(p, {"secagg": proto}), round_of(p)
    task = s.configure_train(rnd, ctx())
    assert task["secure_aggregation"] == {"protocol": "fake"}
    assert proto.bounds == [s.upload_bound(p)]  # the protocol quantizes for the mechanism's noise
    assert not s.admission_open(rnd) and s.may_reanswer(rnd, "again") and not s.may_reanswer(rnd, "other")
    assert s.runs_own_deadlines(rnd) and s.protocol_summary(rnd) == {"fake": 7}
    with pytest.raises(Rejection) as info:
        s.decode_upload(upload(0.1), rnd, ctx())
    assert info.value.reason == "wrong_protocol"


# ---------------------------------------------------------------------- the ledger event
def test_each_dp_release_is_one_ledger_event_and_plain_rounds_none() -> None:
    assert strategy_for(params()).ledger_event(params(), 10, 100) is None
    for mode in ("central", "distributed", "local"):
        # without a secret draw nothing is sampled: q = 1 whatever the cohort / population (no amplification)
        p = params(dp_mode=mode)
        for n, population in ((10, 40), (50, 40), (3, 0)):
            event = strategy_for(p).ledger_event(p, n, population)
            assert (event.noise_multiplier, event.sampling_prob, event.accounted_multiplier) == (Z, 1.0, Z)
        # with one, exactly the configured q; a capped cohort doubles the sensitivity (z / 2 accounted)
        sel = params(dp_mode=mode, selection_q=0.03)
        event = strategy_for(sel).ledger_event(sel, 10, 40)
        assert (event.noise_multiplier, event.sampling_prob, event.accounted_multiplier) == (Z, 0.03, Z)
        capped = params(dp_mode=mode, selection_q=0.03, selection_max_cohort=13)
        event = strategy_for(capped).ledger_event(capped, 10, 40)
        assert (event.sampling_prob, event.sensitivity, event.accounted_multiplier) == (0.03, 2.0, Z / 2)


def test_selection_refuses_devices_outside_the_hmac_draw() -> None:
    import hashlib
    import hmac

    from server.strategy.dp import NOT_SELECTED, selection_key

    q = 0.3
    p = params(dp_mode="central", selection_q=q)
    rnd = dataclasses.replace(round_of(p, rid=11, seed=987654321), state="open", deadline=None)
    s = strategy_for(p)
    key = selection_key(rnd)
    assert int.from_bytes(key[-16:-8], "big") == 987654321 and int.from_bytes(key[-8:], "big") == 11
    ids = [f"dev-{i}" for i in range(400)]
    refused = {d: s.admission_refusal(rnd, d) for d in ids}
    for d in ids:
        u = int.from_bytes(hmac.new(key, d.encode(), hashlib.sha256).digest(), "big") / 2 ** 256
        if u < q:
            assert refused[d] is None
        else:  # come back once the round is expected to be over (a full deadline before the first admission)
            assert refused[d][0] == NOT_SELECTED and refused[d][1] >= p.deadline_s
    assert 0.2 < sum(r is None for r in refused.values()) / len(ids) < 0.4
    # another round (another secret seed) draws afresh; DP-FTRL and no-selection rounds draw nothing
    other = dataclasses.replace(rnd, seed=5)
    assert [s.admission_refusal(other, d) is None for d in ids] != [refused[d] is None for d in ids]
    plain = params(dp_mode="central")
    assert all(strategy_for(plain).admission_refusal(round_of(plain), d) is None for d in ids)


def test_assumptions_say_how_the_cohort_was_drawn() -> None:
    sel = params(dp_mode="central", selection_q=0.05)
    text = "; ".join(strategy_for(sel).assumptions(sel))
    assert "trusted server" in text and "probability 0.05" in text and "never revealed" in text
    plain = params(dp_mode="local")
    text = "; ".join(strategy_for(plain).assumptions(plain))
    assert "noised on each device" in text and "no amplification" in text
    dist = params(dp_mode="distributed")
    assert "without secure aggregation" in "; ".join(strategy_for(dist).assumptions(dist))
    assert strategy_for(params()).assumptions(params()) == []


def test_device_view_epsilon_only_for_device_noise() -> None:
    delta = 1e-5
    assert device_view_epsilon(strategy_for(params()), params(), delta) == {}
    central = params(dp_mode="central")
    assert device_view_epsilon(strategy_for(central), central, delta) == {}
    local, dist = params(dp_mode="local"), params(dp_mode="distributed")
    lv = device_view_epsilon(strategy_for(local), local, delta)
    dv = device_view_epsilon(strategy_for(dist), dist, delta)
    assert lv["local_noise_multiplier"] == pytest.approx(Z / 2)
    assert dv["local_noise_multiplier"] == pytest.approx(Z / 2 / math.sqrt(MIN_COUNT))
    assert lv["local_epsilon_per_upload"] < dv["local_epsilon_per_upload"]
    assert "local mode" in lv["local_epsilon_note"] and "secure aggregation" in dv["local_epsilon_note"]


def test_a_new_mechanism_is_one_subclass() -> None:
    """The wrapper protocol is all a mechanism needs: here one that only adds device noise of z * C / 2."""
    class HalfLocal(DPStrategy):
        mechanism = "half_local"

        def device_noise_stddev(self, p: TrainParams) -> float:
            return p.noise_multiplier * p.clip_norm / 2

    p = params()
    s = HalfLocal(StreamingMean())
    assert s.configure_train(round_of(p), ctx())["noise_stddev"] == Z * CLIP / 2
    assert s.weight(p, 9) == 1.0 and s.ledger_event(p, 1, 1) is not None


# ---------------------------------------------------------------------- the typed round
def test_round_params_parse_old_rows_and_keep_unknown_keys_for_reports() -> None:
    stored = {"goal": 5, "min_count": 2, "max_admitted": 7, "deadline_s": 30, "upload_dtypes": ["float16"],
              "secure_aggregation": None, "some_future_key": 1}
    p = parse_params("train", stored)
    assert p.upload_dtypes == ("float16",) and p.secure_aggregation == "none" and p.secagg_bits == 32
    row = {"id": 3, "kind": "train", "state": "open", "base_version": 1, "candidate_version": None,
           "created_at": 1.0, "deadline": None, "closed_at": None, "params": json.dumps(stored),
           "seed": 9, "result_version": None, "noise_multiplier": None, "sampling_prob": None, "population": None,
           "epsilon": None, "delta": None, "outcome": None}
    rnd = Round.from_row(row)
    assert rnd.params == p and rnd.params_dict == stored and rnd.protocol == "none" and not rnd.is_over
    assert rnd.past_deadline(0.0) is False
