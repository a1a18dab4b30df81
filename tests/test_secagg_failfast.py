"""No silent waits in SecAgg: a round that can no longer reach its threshold fails at once, and a stage
that nobody else can answer closes at once (server/secagg/dropouts.py, protocol.decide_early).

The pure judgement is tested stage by stage on counts; then a real server (stage deadlines of 300 s)
with real devices over HTTP: devices that give up tell the server (POST .../secagg/abort, as
device_app/secagg.py does), and the round ends within seconds of the last event, not at its deadline.
Tests wait for states by polling, never by sleeping a lucky amount.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from device_app.privacy_sim import SimDevice
from device_app.secagg import SecAggError, SecAggSession
from server.round import TrainParams
from server.secagg import protocol as proto
from server.secagg.protocol import Fail, SecAggState, Tally
from server.strategy import UploadBound
from tests.server_fixtures import TINY, ServerProcess, secagg_server, wait_for

# ---------------------------------------------------------------------- the pure judgement, per stage
PARAMS = TrainParams(goal=4, min_count=3, max_admitted=4, deadline_s=60.0, clip_norm=1.0,
                     secure_aggregation="secagg", secagg_min_participants=3, secagg_stage_s=30.0)
DEVICES = ["d_a", "d_b", "d_c", "d_d"]


def _state(stage: str, threshold: int | None = 3) -> SecAggState:
    q = proto.quantization_for(PARAMS, UploadBound(1.0, 0.0, 6.0), 40)
    return SecAggState(round_id=1, session="s", stage=stage, stage_deadline=None, quantization=q, graph_k=0,
                       graph_seed="g", threshold=threshold, u1=DEVICES, u2=DEVICES, u3=DEVICES[:3], sum_file=None,
                       sum_count=0, result_file=None, info={}, cleaned=False)


def _tally(stage: str, eligible: int, submitted: int, dropped: int, left_after: int = 0,
           open_slots: int = 0) -> Tally:
    st = _state(stage, None if stage == "advertise" else 3)
    return Tally(stage, eligible, submitted, dropped, left_after, *proto.stage_needs(st, PARAMS), open_slots)


def test_stage_needs_follow_each_close_rule() -> None:
    # min participants 3, threshold 3 (of 4 holders)
    assert proto.stage_needs(_state("advertise", None), PARAMS) == (3, 3)
    assert proto.stage_needs(_state("share"), PARAMS) == (3, 3)
    assert proto.stage_needs(_state("masked"), PARAMS) == (3, 3)
    assert proto.stage_needs(_state("consistency"), PARAMS) == (3, 3)
    assert proto.stage_needs(_state("unmask"), PARAMS) == (3, 0)  # the last stage: nothing after it
    assert proto.stage_needs(_state("finishing"), PARAMS) == (0, 0)
    lenient = TrainParams(**{**PARAMS.__dict__, "min_count": 2, "secagg_min_participants": 2})
    assert proto.stage_needs(_state("masked"), lenient) == (3, 3)  # the threshold, above the minimum
    assert proto.stage_needs(_state("masked", 2), lenient) == (2, 2)


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "consistency", "unmask"])
def test_each_stage_fails_at_once_when_too_few_can_still_answer(stage: str) -> None:
    # 4 may answer, 1 did, 2 left: at most 2 answers, 3 needed
    verdict = proto.decide_early(_tally(stage, 4, 1, 2))
    assert isinstance(verdict, Fail) and verdict.reason.startswith(f"secagg_threshold_unreachable: {stage} stage")
    assert verdict.counts == {"secagg_stage": stage, "eligible": 4, "submitted": 1, "dropped": 2, "pending": 1,
                              "needed": 3}
    assert not proto.threshold_reachable(_tally(stage, 4, 1, 2))
    # one fewer dropout: still reachable, and someone may still answer: wait
    assert proto.threshold_reachable(_tally(stage, 4, 1, 1)) and proto.decide_early(_tally(stage, 4, 1, 1)) is None
    # everyone answered or left, enough answered: close now, not at the deadline
    assert proto.decide_early(_tally(stage, 4, 3, 1)) == "close"


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "consistency", "unmask"])
def test_nothing_is_decided_early_without_dropouts(stage: str) -> None:
    """Devices that did not answer yet may still: only the stage's own rule or its deadline decides."""
    for submitted in range(4):
        assert proto.decide_early(_tally(stage, 4, submitted, 0)) is None


def test_free_admission_slots_keep_the_advertise_stage_open() -> None:
    assert isinstance(proto.decide_early(_tally("advertise", 3, 0, 2)), Fail)  # 3 admitted (max 4), 2 left
    assert proto.decide_early(_tally("advertise", 2, 0, 1, open_slots=2)) is None  # two more may join
    assert proto.decide_early(_tally("advertise", 4, 3, 1, open_slots=0)) == "close"


@pytest.mark.parametrize("stage", ["share", "masked", "consistency"])
def test_devices_that_left_after_answering_cannot_carry_the_later_stages(stage: str) -> None:
    """3 of 4 answered (enough for this stage), 1 left without answering, 2 left after answering: only 1 device
    can take the next stage, which needs 3: fail now rather than in the next stage at its deadline."""
    verdict = proto.decide_early(_tally(stage, 4, 3, 1, left_after=2))
    assert isinstance(verdict, Fail) and "1 devices left for the later stages, 3 needed" in verdict.reason
    assert verdict.counts["dropped"] == 3 and verdict.counts["submitted"] == 3


def test_leaving_after_the_unmasking_shares_does_not_matter() -> None:
    assert proto.decide_early(_tally("unmask", 4, 3, 1, left_after=3)) == "close"


def test_the_measured_round_fails_at_once() -> None:
    """Issue #19: 20 admitted, 17 masked inputs, 18 needed; the other 3 had left. It waited 300 s."""
    tally = Tally("masked", eligible=20, submitted=17, dropped=3, left_after=0, needed=18, needed_later=14)
    verdict = proto.decide_early(tally)
    assert isinstance(verdict, Fail)
    assert verdict.reason == ("secagg_threshold_unreachable: masked stage: 17 of 20 answered, 3 dropped out, "
                              "0 can still answer; 18 needed")
    assert verdict.counts == {"secagg_stage": "masked", "eligible": 20, "submitted": 17, "dropped": 3,
                              "pending": 0, "needed": 18}


def test_deadline_failures_carry_counts_too() -> None:
    st = _state("masked")
    fail = proto.close_masked(st, PARAMS, DEVICES[:2], 0.0)
    assert isinstance(fail, Fail) and fail.counts == {"secagg_stage": "masked", "eligible": 4, "submitted": 2,
                                                      "dropped": 2, "pending": 0, "needed": 3}
    assert proto.close_unmask(_state("unmask"), 2, 3).counts["eligible"] == 3


def test_abort_reason_is_checked() -> None:
    from server.errors import Rejection

    assert proto.parse_abort({"reason": "bad_share"}) == "bad_share"
    assert proto.parse_abort({}) == "unspecified"
    for bad in ({"reason": ""}, {"reason": 3}, {"reason": "x" * 65}):
        with pytest.raises(Rejection):
            proto.parse_abort(bad)


# ---------------------------------------------------------------------- a real server, real devices
N = 6  # threshold 4 of 6
DIM = TINY.num_parameters()
LONG = 300.0  # every deadline: a round that waited for one would time the test out


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = secagg_server(tmp_path_factory.mktemp("failfast"), N, LONG)
    yield s
    s.stop()


def _delta(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, 0.004, DIM)
    return (x * min(1.0, 0.9 / np.linalg.norm(x))).astype(np.float32)


class Runner:
    """One SimDevice driven stage by stage (device_app.secagg.SecAggSession), in its own thread."""

    def __init__(self, srv: ServerProcess, seed: int, transport: httpx.BaseTransport | None = None) -> None:
        self.dev = SimDevice(srv.url, seed=seed, transport=transport)
        self.seed = seed
        self.session: SecAggSession | None = None
        self.error: SecAggError | None = None
        self.error_at: float | None = None
        self.done = threading.Event()

    def keys(self) -> None:
        """Advertise and share keys (the stages before training), once checked in."""
        task = self.dev.task
        assert task is not None and task.secure_aggregation["urls"]["abort"].endswith("/secagg/abort")
        self.dev.secagg.register(self.dev.api)
        hook = self.dev.secagg
        self.session = SecAggSession(task.secure_aggregation, self.dev.device_id, hook.identity, hook.pins, 2,
                                     task.deadline)
        self.session.advertise(self.dev.api)
        self.session.receive_keys(self.session.wait_stage(self.dev.api, self.session.urls["advertise_keys"]))
        self.session.share(self.dev.api, wait_next=True)

    def upload_and_finish(self) -> None:
        s, api = self.session, self.dev.api
        try:
            s.receive_shares(s.wait_stage(api, s.urls["share_keys"]))
            s.post_masked(api, s.masked_blob(_delta(self.seed), {"num_examples": 10, "metrics": {"loss": 1.0}},
                                             self.dev.rng))
            s.finish(api)
        except SecAggError as exc:
            self.error, self.error_at = exc, time.time()
        finally:
            self.done.set()


def _in_parallel(fns: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=f, daemon=True) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)


def _cohort(srv: ServerProcess, seed: int, transports: dict[int, httpx.BaseTransport] | None = None) -> list[Runner]:
    """N devices past the share stage of one round (every one shared: the masked-input stage is open)."""
    runners = [Runner(srv, seed + i, (transports or {}).get(i)) for i in range(N)]
    for r in runners:  # check in in order: one round, all admitted
        assert r.dev.checkin() is not None
    _in_parallel([r.keys for r in runners])
    rid = runners[0].dev.task.round_id
    assert srv.round(rid)["secure_aggregation"]["stage"] == "masked"
    return runners


def test_a_round_that_cannot_reach_its_threshold_fails_at_once(srv: ServerProcess) -> None:
    """The measured problem, small: 3 masked inputs in, threshold 4; the other 3 devices give up and say so.
    The round is abandoned when the third leaves, not at its 300 s deadline, with the counts; the devices
    waiting on the stage learn it at their next poll; the next round opens at once."""
    version_before, _ = srv.model()
    runners = _cohort(srv, 100)
    rid = runners[0].dev.task.round_id
    stayers, leavers = runners[:3], runners[3:]
    threads = [threading.Thread(target=r.upload_and_finish, daemon=True) for r in stayers]
    for t in threads:
        t.start()
    wait_for(lambda: srv.round(rid)["accepted"] == 3, "3 masked inputs")
    assert leavers[0].session.leave(leavers[0].dev.api, "training_failed")
    assert leavers[1].session.leave(leavers[1].dev.api, "bad_share")
    r = srv.round(rid)  # 3 in, 1 may still come: 4 can be reached, the round waits
    assert r["state"] == "open" and r["secure_aggregation"]["stage"] == "masked", r
    # a device that left cannot come back (the tally counted it as gone)
    s = leavers[0].session
    with pytest.raises(SecAggError) as err:
        s.post_masked(leavers[0].dev.api, s.masked_blob(_delta(1), {"num_examples": 1, "metrics": {}}, None))
    assert err.value.reason == "round_closed" and "left" in err.value.detail, err.value
    last = time.time()
    assert leavers[2].session.leave(leavers[2].dev.api, "cancelled")
    r = srv.round(rid)  # decided inside the abort request: no deadline, no tick needed
    assert r["state"] == "abandoned", r
    assert r["closed_at"] - last < 5.0 and r["deadline"] - r["closed_at"] > LONG - 60
    assert r["outcome"]["reason"] == "secagg_threshold_unreachable"
    assert {k: r["outcome"][k] for k in ("admitted", "submitted", "dropped", "pending", "needed", "secagg_stage")} \
        == {"admitted": N, "submitted": 3, "dropped": 3, "pending": 0, "needed": 4, "secagg_stage": "masked"}
    assert r["secure_aggregation"]["stage"] == "failed"
    assert r["secure_aggregation"]["failure"].startswith("secagg_threshold_unreachable: masked stage: 3 of 6")
    # the devices waiting on the stage stop at their next poll, with the reason
    for s in stayers:
        assert s.done.wait(30)
        assert s.error is not None and s.error.reason == "round_closed", s.error
        assert "secagg_threshold_unreachable" in s.error.detail
        assert s.error_at - last < 10.0
    # the next round opens at once (the worker, not a device's check-in)
    rounds = wait_for(lambda: [x for x in srv.admin_get("/v1/admin/rounds", params={"kind": "train"})["rounds"]
                               if x["id"] > rid and x["state"] == "open"], "the next round")
    assert rounds
    assert srv.model()[0] == version_before  # nothing released
    for x in runners:
        x.dev.close()


def test_a_stage_that_nobody_else_can_answer_closes_at_once(srv: ServerProcess) -> None:
    """5 devices upload; the 6th stops after training (the app is closing: the hook's SecAggError "cancelled")
    and leaves, as device_app.secagg.SecAggHook does: the masked-input stage closes then, not at its 300 s
    deadline, and the round ends with the exact sum of the 5. (A share altered in transit no longer makes a
    device leave: tests/test_secagg_attacks.py.)"""
    runners = _cohort(srv, 200)
    rid = runners[0].dev.task.round_id
    victim = runners[5]
    victim.dev.secagg.sessions[rid] = victim.session  # the hook's own session: submit() as a DeviceClient runs it
    threads = [threading.Thread(target=r.upload_and_finish, daemon=True) for r in runners[:5]]
    for t in threads:
        t.start()
    wait_for(lambda: srv.round(rid)["accepted"] == 5, "5 masked inputs")
    assert srv.round(rid)["secure_aggregation"]["stage"] == "masked"  # waiting for the 6th
    last = time.time()
    victim.session.should_stop = lambda: True
    with pytest.raises(SecAggError) as err:
        victim.dev.secagg.submit(victim.dev.api, victim.dev.task, [_delta(205)], {"num_examples": 10, "metrics": {}})
    assert err.value.reason == "cancelled"
    r = srv.wait_round(rid, timeout=60)
    assert r["state"] == "closed", r
    info = r["secure_aggregation"]
    assert info["n_u2"] == N and info["n_u3"] == 5 and info["dropped_recovered"] == [victim.dev.device_id]
    assert info["stages"]["masked"]["closed"] - last < 5.0  # closed by the dropout, not by the deadline
    for x in runners[:5]:
        assert x.done.wait(30) and x.error is None, x.error
    want = sum(x.session.quantized for x in runners[:5])  # the server's integer sum is exactly theirs
    assert info["sum_sha256"] == hashlib.sha256(want.astype("<i8").tobytes()).hexdigest()
    for x in runners:
        x.dev.close()


def test_a_device_that_stops_training_tells_the_server(srv: ServerProcess) -> None:
    """SecAggHook.abort (training stopped, the fleet's dropout): the server hears it. Before any masked input,
    devices leave one by one: at the third, 3 can still send one, 4 needed, so the round is abandoned in
    that abort request (the fourth device's report is then refused, quietly)."""
    runners = _cohort(srv, 300)
    rid = runners[0].dev.task.round_id
    for i, r in enumerate(runners[:4]):
        r.dev.secagg.sessions[rid] = r.session
        r.dev.secagg.abort(r.dev.api, r.dev.task)
        assert rid not in r.dev.secagg.sessions
        state = srv.round(rid)["state"]
        assert state == ("open" if i < 2 else "abandoned"), (i, state)  # 3 left: 3 can answer, 4 needed
    r = srv.round(rid)
    assert r["outcome"]["reason"] == "secagg_threshold_unreachable"
    assert (r["outcome"]["submitted"], r["outcome"]["dropped"], r["outcome"]["needed"]) == (0, 3, 4)
    for x in runners:
        x.dev.close()
