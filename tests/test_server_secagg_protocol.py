"""The SecAgg protocol alone (server/secagg/protocol.py): stage transitions and recover_sum on plain
values, with devices simulated by models/secagg_math.py. No database, no files, no HTTP."""
from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest

from models import secagg_math as sm
from server.errors import Rejection
from server.round import TrainParams
from server.secagg import protocol as proto
from server.secagg.protocol import Advance, Fail, SecAggFailure, SecAggState
from server.strategy import UploadBound

DIM, RID, SESSION = 40, 5, "session-1"
CLIP = 1.0
BOUND = UploadBound(CLIP, 0.0, 6.0)
PARAMS = TrainParams(goal=4, min_count=3, max_admitted=4, deadline_s=60.0, clip_norm=CLIP,
                     secure_aggregation="secagg", secagg_min_participants=3, secagg_stage_s=30.0)
DEVICES = ["d_a", "d_b", "d_c", "d_d"]


def fresh_state(graph_k: int = 0) -> SecAggState:
    q = proto.quantization_for(PARAMS, BOUND, DIM)
    return SecAggState(round_id=RID, session=SESSION, stage="advertise", stage_deadline=None, quantization=q,
                       graph_k=graph_k, graph_seed=None, threshold=None, u1=None, u2=None, u3=None, sum_file=None,
                       sum_count=0, result_file=None, info={}, cleaned=False)


def apply(st: SecAggState, result: Advance | Fail) -> SecAggState:
    assert isinstance(result, Advance), result
    return dataclasses.replace(st, stage=result.stage, stage_deadline=result.deadline, **result.fields)


class Cohort:
    """Devices that advertised, shared, masked their updates; `survivors` sent masked inputs."""

    def __init__(self, survivors: list[str], graph_k: int = 0) -> None:
        st = apply(fresh_state(graph_k), proto.close_advertise(fresh_state(graph_k), PARAMS, DEVICES, 100.0, "g"))
        assert st.stage == "share" and st.stage_deadline == 130.0 and st.u1 == sorted(DEVICES)
        self.graph = sm.neighbours(st.u1, st.graph_k, st.graph_seed)
        index = {u: i + 1 for i, u in enumerate(st.u1)}
        rng = np.random.default_rng(4)
        self.updates = {u: rng.uniform(-0.1, 0.1, DIM) for u in DEVICES}
        keys = {u: sm.x25519_keypair() for u in DEVICES}  # (private, public)
        self.s_pks = {u: keys[u][1] for u in DEVICES}
        self.b_seeds = {u: secrets.token_bytes(32) for u in DEVICES}
        self.commitments = {u: sm.commitment(SESSION, RID, u, self.b_seeds[u]) for u in DEVICES}
        # shares of b_u and s_sk_u, held by u's neighbours (and u itself for b_u)
        self.b_shares, self.s_shares = {}, {}
        for u in DEVICES:
            holders = [index[u]] + [index[v] for v in self.graph[u]]
            self.b_shares[u] = sm.shamir_split(sm.secret_to_int(self.b_seeds[u]), holders, st.threshold)
            self.s_shares[u] = sm.shamir_split(sm.secret_to_int(keys[u][0]), holders, st.threshold)
        st = apply(st, proto.close_share(st, PARAMS, DEVICES, 200.0, round_deadline=150.0))
        assert st.stage == "masked" and st.stage_deadline == 230.0
        q, ctx = st.quantization, sm.round_context(SESSION, RID)
        self.total = np.zeros(DIM, sm.ring_dtype(q.bits))
        self.quantized = np.zeros(DIM, np.int64)
        self.quantized_of: dict[str, np.ndarray] = {}
        self.masked: dict[str, np.ndarray] = {}  # as the server keeps them until the round closes
        for u in survivors:
            qu = self.quantized_of[u] = sm.quantize(self.updates[u], q)
            self.quantized += qu
            y = self.masked[u] = sm.mask(sm.to_ring(qu, q.bits), q.bits, u, self.b_seeds[u], keys[u][0],
                                         {v: self.s_pks[v] for v in self.graph[u]}, ctx)
            np.add(self.total, y, out=self.total)
        st = apply(st, proto.close_masked(st, PARAMS, survivors, 300.0))
        st = apply(st, proto.close_consistency(st, PARAMS, len(survivors), 400.0))
        self.state = apply(st, proto.close_unmask(st, len(survivors)))
        assert self.state.stage == "finishing"
        self.index = index

    def unmask_body(self, d: str) -> dict[str, dict[str, str]]:
        want_b, want_s = proto.unmask_wants(self.state, self.graph, d)
        share = lambda shares, v: sm.b64(sm.share_to_bytes(shares[v][self.index[d]]))  # noqa: E731
        return {"b": {v: share(self.b_shares, v) for v in want_b}, "s": {v: share(self.s_shares, v) for v in want_s}}

    def recover(self, bodies=None, total=None) -> proto.Recovered:
        bodies = bodies if bodies is not None else {d: self.unmask_body(d) for d in self.state.u3}
        return proto.recover_sum(self.state, self.s_pks, self.commitments, bodies,
                                 self.total if total is None else total, self.graph, DIM, BOUND, self.masked.get)


@pytest.mark.parametrize("graph_k", [0, 2])
def test_recover_sum_removes_every_mask_including_a_dropped_devices(graph_k: int) -> None:
    cohort = Cohort(["d_a", "d_b", "d_c"], graph_k)  # d_d shared keys, then dropped
    assert cohort.state.dropped == {"d_d"}
    rec = cohort.recover()
    np.testing.assert_array_equal(rec.total, sm.dequantize(cohort.quantized, cohort.state.quantization))
    assert rec.dropped_recovered == ["d_d"]
    np.testing.assert_allclose(rec.total, sum(cohort.updates[u] for u in ("d_a", "d_b", "d_c")),
                               atol=3 / cohort.state.quantization.scale)


def test_an_altered_share_or_masked_sum_is_caught() -> None:
    cohort = Cohort(["d_a", "d_b", "d_c"])
    bodies = {d: cohort.unmask_body(d) for d in cohort.state.u3}
    victim = next(iter(bodies["d_b"]["b"]))
    altered = sm.share_from_bytes(sm.unb64(bodies["d_b"]["b"][victim])) ^ 1
    bodies["d_b"]["b"][victim] = sm.b64(sm.share_to_bytes(altered))
    with pytest.raises(SecAggFailure) as info:
        cohort.recover(bodies)
    assert info.value.reason == "secagg_bad_share"
    tampered = cohort.total.copy()
    tampered[3] += np.uint32(1 << 30)  # what a mask left in looks like: far out of range
    with pytest.raises(SecAggFailure) as info:
        cohort.recover(total=tampered)
    assert info.value.reason == "secagg_integrity"


def test_too_few_unmasking_shares_fail() -> None:
    cohort = Cohort(["d_a", "d_b", "d_c"])
    only = {"d_a": cohort.unmask_body("d_a")}
    with pytest.raises(SecAggFailure) as info:
        cohort.recover(only)
    assert info.value.reason == "secagg_below_threshold"


def test_every_stage_fails_below_its_threshold() -> None:
    st = fresh_state()
    fail = proto.close_advertise(st, PARAMS, DEVICES[:2], 0.0)
    assert isinstance(fail, Fail) and fail.reason.startswith("secagg_too_few_keys: 2 devices")
    st = apply(st, proto.close_advertise(st, PARAMS, DEVICES, 0.0, "g"))
    assert st.threshold == sm.threshold_for(4, PARAMS.secagg_threshold) == 3
    assert isinstance(proto.close_share(st, PARAMS, DEVICES[:2], 0.0, None), Fail)
    st = apply(st, proto.close_share(st, PARAMS, DEVICES, 0.0, None))
    assert isinstance(proto.close_masked(st, PARAMS, DEVICES[:2], 0.0), Fail)
    st = apply(st, proto.close_masked(st, PARAMS, DEVICES[:3], 0.0))
    assert st.u3 == DEVICES[:3] and st.ready_after("masked") and not st.ready_after("consistency")
    assert isinstance(proto.close_consistency(st, PARAMS, 2, 0.0), Fail)
    assert isinstance(proto.close_unmask(st, 2), Fail)
    assert proto.close_unmask(st, 3).stage == "finishing"


def test_device_messages_are_checked() -> None:
    c_pk, s_pk, sig = sm.b64(b"c" * 32), sm.b64(b"s" * 32), sm.b64(b"x" * 64)
    assert proto.parse_advertise({"c_pk": c_pk, "s_pk": s_pk, "signature": sig}) == (b"c" * 32, b"s" * 32, b"x" * 64)
    for bad in ({"c_pk": c_pk, "s_pk": c_pk, "signature": sig}, {"c_pk": "!", "s_pk": s_pk, "signature": sig}):
        with pytest.raises(Rejection) as info:
            proto.parse_advertise(bad)
        assert (info.value.reason, info.value.status) == ("bad_request", 422)
    commit = "ab" * 32
    shares, got = proto.parse_shares({"shares": [{"to": "d_b", "ct": sm.b64(b"1"), "sig": sig}], "b_commitment": commit},
                                     {"d_b"})
    assert shares == [("d_b", b"1", b"x" * 64)] and got == commit
    for body in ({"shares": [], "b_commitment": commit},  # a neighbour left out
                 {"shares": [{"to": "d_z", "ct": sm.b64(b"1"), "sig": sig}], "b_commitment": commit},  # not a neighbour
                 {"shares": [{"to": "d_b", "ct": sm.b64(b"1" * 600), "sig": sig}], "b_commitment": commit},  # too large
                 {"shares": [{"to": "d_b", "ct": sm.b64(b"1")}], "b_commitment": commit},  # unsigned
                 {"shares": [{"to": "d_b", "ct": sm.b64(b"1"), "sig": sm.b64(b"x" * 63)}], "b_commitment": commit}):
        with pytest.raises(Rejection):
            proto.parse_shares(body, {"d_b"})
    with pytest.raises(Rejection):
        proto.parse_unmask({"b_shares": {}, "s_shares": {}}, {"d_a"}, set())


def test_task_and_summary_describe_the_state() -> None:
    from server.round import Round

    st = fresh_state()
    rnd = Round(id=RID, kind="train", state="open", base_version=1, candidate_version=None, created_at=0.0,
                deadline=None, closed_at=None, params=PARAMS, params_dict={})
    task = proto.task_params(rnd, st)
    assert task["session"] == SESSION and task["quantization"] == st.quantization.to_dict()
    assert task["min_participants"] == 3 and task["urls"]["unmasking"] == f"/v1/rounds/{RID}/secagg/unmasking"
    assert proto.summary(st)["stage"] == "advertise" and proto.summary(st)["n_u1"] == 0
