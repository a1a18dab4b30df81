"""SecAgg against a cheating peer (issue #18 item 3): one malicious device must not abort a round.

Unit tests of the pure functions (models/secagg_math.py: the X25519 key check, robust Shamir
reconstruction; server/secagg/protocol.py: the unmasking message, recover_sum with a bad revealer or a
peer whose shares nobody could decrypt), then each attack run against a real server on loopback with
real devices (device_app.secagg.SecAggSession, driven as tests/test_secagg_failfast.py drives them):

    low-order key       refused at advertise (secagg_bad_key), the device is out of the round
    duplicate keys      refused at advertise (secagg_duplicate_key)
    garbage shares      honest holders treat the sender as a dropped holder and go on; if it then uploads
                        a masked input, that input is taken out of the sum; unsigned shares are refused
    bad revealed share  the revealer is left out of reconstruction, not the round abandoned
    out-of-range input  a masked input in another ring, or with metadata out of range, is refused at upload

In each the round completes with the exact sum of the honest survivors, and the offender is named in
the round's secure-aggregation info ("offenders"), which the admin's round view shows. Tests wait for
events (a response, a round state), never a lucky sleep.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np
import pytest

from device_app.http_client import ServerError
from device_app.privacy_sim import TamperTransport
from device_app.secagg import SecAggError, SecAggSession
from models import secagg_math as sm
from server.errors import REASONS, Rejection
from server.secagg import protocol as proto
from server.secagg.protocol import SecAggFailure
from tests.server_fixtures import ServerProcess, secagg_server, wait_for
from tests.test_secagg_failfast import LONG, N, Runner, _delta, _in_parallel
from tests.test_server_secagg_protocol import Cohort

# ====================================================================== pure functions


def test_low_order_and_non_canonical_keys_are_refused() -> None:
    for point in sm.X25519_LOW_ORDER:
        assert sm.x25519_key_problem(point) is not None
        with pytest.raises(sm.SecAggMathError):  # why: every agreement with it is all zeros
            sm.agreed_key(sm.x25519_keypair()[0], point, b"x", b"ctx")
    p = sm.X25519_P
    for u in (p, p + 1):  # aliases of 0 and 1 (non-canonical encodings)
        assert "non-canonical" in sm.x25519_key_problem(u.to_bytes(32, "little"))
    assert (p - 1).to_bytes(32, "little") in sm.X25519_LOW_ORDER  # the point of order 2
    high = bytearray(sm.x25519_keypair()[1])
    high[31] |= 0x80  # the top bit X25519 ignores: another encoding of the same point
    assert "non-canonical" in sm.x25519_key_problem(bytes(high))
    assert sm.x25519_key_problem(b"\x09" + bytes(31)) is None  # the base point
    assert sm.x25519_key_problem(bytes(31)) == "not 32 bytes"
    for _ in range(20):
        assert sm.x25519_key_problem(sm.x25519_keypair()[1]) is None
    assert proto.key_problem(sm.x25519_keypair()[1], bytes(32)).startswith("s_pk is")
    assert proto.key_problem(sm.x25519_keypair()[1], sm.x25519_keypair()[1]) is None


def test_lagrange_at_evaluates_the_polynomial() -> None:
    shares = sm.shamir_split(777, [1, 2, 3, 4, 5, 9], 3)

    def at(xs: tuple[int, ...], x: int) -> int:
        return sum(c * shares[y] for c, y in zip(sm.lagrange_at(xs, x), xs)) % sm.PRIME

    xs = (1, 3, 5)
    for x in (2, 4, 9):
        assert at(xs, x) == shares[x]
    assert at((2, 4, 9), 1) == shares[1]
    with pytest.raises(sm.SecAggMathError):
        sm.lagrange_at(xs, 3)


def test_checked_reconstruction_leaves_out_bad_shares() -> None:
    secret = 123456789
    xs = [1, 2, 3, 4, 5, 6, 7]
    honest = sm.shamir_split(secret, xs, 4)
    ok = secret.__eq__
    assert sm.shamir_reconstruct_checked(honest, 4, ok) == (secret, [])  # one interpolation: nothing checked
    one_bad = {**honest, 2: honest[2] ^ 1}
    assert sm.shamir_reconstruct_checked(one_bad, 4, ok) == (secret, [2])
    two_bad = {**honest, 1: 5, 4: honest[4] + 1}
    assert sm.shamir_reconstruct_checked(two_bad, 4, ok) == (secret, [1, 4])
    unused_bad = {**honest, 7: 0}  # not among the first t: harmless, and not looked at
    assert sm.shamir_reconstruct_checked(unused_bad, 4, ok) == (secret, [])
    with pytest.raises(sm.SecAggMathError):  # 4 bad of 7, t = 4: no 4 good shares
        sm.shamir_reconstruct_checked({**honest, 1: 1, 2: 2, 3: 3, 4: 4}, 4, ok)
    with pytest.raises(sm.SecAggMathError):
        sm.shamir_reconstruct_checked({1: honest[1]}, 4, ok)
    with pytest.raises(sm.SecAggMathError):  # the search is bounded
        sm.shamir_reconstruct_checked(one_bad, 4, lambda v: False, max_tries=3)


def test_unmasking_message_lists_every_share_it_leaves_out() -> None:
    share = sm.b64(sm.share_to_bytes(5))
    seed = sm.b64(bytes(32))
    want_b, want_s = {"a", "b"}, {"d"}
    full = {"b_shares": {"a": share, "b": share}, "s_shares": {"d": share}}
    assert proto.parse_unmask(full, want_b, want_s, "a") == (full["b_shares"], full["s_shares"], {}, {})
    partial = {"b_shares": {"a": share}, "s_shares": {}, "pair_seeds": {"d": seed},
               "complaints": {"b": "bad_share", "d": "bad_share"}}
    assert proto.parse_unmask(partial, want_b, want_s, "a")[2:] == ({"d": seed}, partial["complaints"])
    for bad in ({**partial, "complaints": {"b": "bad_share"}},  # d left out without saying why
                {**partial, "b_shares": {"b": share}, "complaints": {"a": "x", "d": "x"}},  # its own share missing
                {**full, "pair_seeds": {"d": seed}},  # a pair seed next to the share: never both
                {**partial, "pair_seeds": {"d": "!"}}):
        with pytest.raises(Rejection):
            proto.parse_unmask(bad, want_b, want_s, "a")


def test_recover_sum_leaves_out_a_bad_revealer_and_names_it() -> None:
    cohort = Cohort(["d_a", "d_b", "d_c", "d_d"])  # nobody dropped: 4 revealers, threshold 3
    bodies = {d: cohort.unmask_body(d) for d in cohort.state.u3}
    for v, share in bodies["d_a"]["b"].items():  # d_a (share point 1: always among the first t) lies
        bodies["d_a"]["b"][v] = sm.b64(sm.share_to_bytes(sm.share_from_bytes(sm.unb64(share)) ^ 1))
    rec = cohort.recover(bodies)
    np.testing.assert_array_equal(rec.total, sm.dequantize(cohort.quantized, cohort.state.quantization))
    assert [(o["device_id"], o["reason"]) for o in rec.offenders] == [("d_a", "secagg_bad_revealed_share")]


def test_recover_sum_without_a_dropped_cheaters_mask_key() -> None:
    """d_d shared bad ciphertexts and dropped: no survivor holds a share of its mask key, each reveals the
    pairwise seed it used with d_d instead; the sum is exact and d_d is named by all three."""
    cohort = Cohort(["d_a", "d_b", "d_c"])
    ctx = sm.round_context("session-1", 5)
    s_sks = {}
    for u in cohort.state.u1:  # the Cohort keeps shares, not keys: rebuild d_d's key from them
        s_sks[u] = sm.int_to_secret(sm.shamir_reconstruct(cohort.s_shares[u], cohort.state.threshold))
    bodies = {}
    for d in cohort.state.u3:
        body = cohort.unmask_body(d)
        del body["s"]["d_d"]
        body["p"] = {"d_d": sm.b64(sm.mask_seed(s_sks[d], cohort.s_pks["d_d"], ctx))}
        body["c"] = {"d_d": "bad_share"}
        bodies[d] = body
    rec = cohort.recover(bodies)
    np.testing.assert_array_equal(rec.total, sm.dequantize(cohort.quantized, cohort.state.quantization))
    assert rec.dropped_recovered == ["d_d"]
    assert rec.offenders[0]["device_id"] == "d_d" and rec.offenders[0]["reported_by"] == ["d_a", "d_b", "d_c"]
    del bodies["d_c"]["p"]  # a survivor's pairwise mask with d_d cannot be removed: fail, still naming d_d
    with pytest.raises(SecAggFailure) as info:
        cohort.recover(bodies)
    assert info.value.reason == "secagg_below_threshold" and info.value.offenders[0]["device_id"] == "d_d"


def test_recover_sum_takes_out_a_surviving_cheaters_masked_input() -> None:
    """d_d sent every holder a signed ciphertext that does not decrypt, then a masked input: no t shares of
    its self-mask seed exist. Its holders complain and reveal the pairwise seed each used with it; its kept
    masked input is subtracted. The sum is exactly the other three's, d_d is named and reported removed.
    Without one holder's seed, or when no complaint proves d_d at fault, the round fails as before."""
    cohort = Cohort(["d_a", "d_b", "d_c", "d_d"])
    ctx = sm.round_context("session-1", 5)
    s_sks = {u: sm.int_to_secret(sm.shamir_reconstruct(cohort.s_shares[u], cohort.state.threshold))
             for u in cohort.state.u1}
    honest = ["d_a", "d_b", "d_c"]

    def bodies_for(reason: str) -> dict[str, dict[str, Any]]:
        out = {}
        for d in honest:
            body = cohort.unmask_body(d)
            del body["b"]["d_d"]
            body["p"] = {"d_d": sm.b64(sm.mask_seed(s_sks[d], cohort.s_pks["d_d"], ctx))}
            body["c"] = {"d_d": reason}
            out[d] = body
        out["d_d"] = cohort.unmask_body("d_d")  # it reveals its own share: one of the t needed
        return out

    bodies = bodies_for("bad_share")
    rec = cohort.recover(bodies)
    want = sum(cohort.quantized_of[d] for d in honest)
    np.testing.assert_array_equal(rec.total, sm.dequantize(want, cohort.state.quantization))
    assert rec.removed == ["d_d"] and rec.dropped_recovered == []
    (named,) = rec.offenders
    assert (named["device_id"], named["reason"]) == ("d_d", "secagg_bad_share_ciphertext")
    assert "taken out of the sum" in named["detail"] and named["reported_by"] == honest
    del bodies["d_c"]["p"]
    with pytest.raises(SecAggFailure) as info:
        cohort.recover(bodies)
    assert info.value.reason == "secagg_below_threshold" and info.value.offenders[0]["device_id"] == "d_d"
    with pytest.raises(SecAggFailure) as info:  # the relay's doing, not d_d's: nothing to take out
        cohort.recover(bodies_for("bad_signature"))
    assert info.value.offenders[0]["reason"] == "secagg_share_not_delivered"


class _Relay:
    """A stand-in for the device's API client: records what the session posts."""

    def __init__(self) -> None:
        self.posts: dict[str, dict[str, Any]] = {}

    def post_json(self, url: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.posts[url] = body
        return {"status": "accepted"}


def test_device_treats_a_peer_with_a_bad_key_or_bad_share_as_a_dropped_holder() -> None:
    """Without a server: d_d advertises a low-order share key (signed), d_c signs a ciphertext for d_a that
    does not decrypt. d_a does not stop: it gives d_d no share, holds none of d_c's or d_d's, and its
    unmasking message names both (complaints) with the pairwise seeds for the dropped d_d and for d_c
    (a survivor, but one its own signature proves at fault), in a form the server accepts. A share the
    relay altered (its signature fails) names the sender too, but reveals nothing for a survivor."""
    from device_app.secagg import DeviceIdentity, PeerPins

    ids = ["d_a", "d_b", "d_c", "d_d"]
    q = sm.choose_quantization(1.0, 0.0, 10, 4)
    params = {"round_id": 7, "session": "sess", "quantization": q.to_dict(), "threshold_fraction": 2 / 3,
              "neighbors": 0, "min_participants": 3, "stage_timeout_s": 5.0,
              "urls": {"share_keys": "/share", "unmasking": "/unmask"}}
    idents = {u: DeviceIdentity(sm.ed25519_keypair()[0]) for u in ids}
    sessions = {u: SecAggSession(params, u, idents[u], PeerPins(), 3) for u in ids}
    low = sorted(sm.X25519_LOW_ORDER)[3]
    sessions["d_d"].c_pk = low
    plist = []
    for i, u in enumerate(ids):
        s = sessions[u]
        sig = idents[u].sign(sm.advertise_message("sess", 7, u, s.c_pk, s.s_pk))
        plist.append({"device_id": u, "index": i + 1, "c_pk": sm.b64(s.c_pk), "s_pk": sm.b64(s.s_pk),
                      "signature": sm.b64(sig), "identity_key": sm.b64(idents[u].public)})
    cohort = {"session": "sess", "participants": plist, "threshold": 3, "neighbors": 0, "graph_seed": "g"}
    relays = {u: _Relay() for u in ids[:3]}
    for u in ids[:3]:
        sessions[u].receive_keys(cohort)
        assert sessions[u].no_share == {"d_d": "bad_key"}
        sessions[u].share(relays[u])
    def inbox_of(me: str) -> list[dict[str, str]]:
        return [{"from": u, **{k: x[k] for k in ("ct", "sig")}} for u in ("d_a", "d_b", "d_c") if u != me
                for x in relays[u].posts["/share"]["shares"] if x["to"] == me]

    inbox = inbox_of("d_a")
    garbage = os.urandom(200)  # d_c's own doing: signed by d_c
    inbox[1].update(ct=sm.b64(garbage), sig=sm.b64(idents["d_c"].sign(sm.share_message(a_ctx := sessions["d_a"].ctx,
                                                                                       "d_c", "d_a", garbage))))
    a = sessions["d_a"]
    a.receive_shares({"u2": ids, "shares": inbox})  # d_d sent nothing usable: no ciphertext listed at all
    assert set(a.held) == {"d_b"} and a.no_share == {"d_c": "bad_share", "d_d": "bad_key"}
    body = a.unmask_body(["d_a", "d_b", "d_c"])  # d_d dropped
    assert body["complaints"] == {"d_c": "bad_share", "d_d": "bad_key"}
    assert set(body["pair_seeds"]) == {"d_c", "d_d"}
    assert sm.unb64(body["pair_seeds"]["d_d"]) == sm.mask_seed(sessions["d_d"].s_sk, a.s_pk, a_ctx)
    assert sm.unb64(body["pair_seeds"]["d_c"]) == sm.mask_seed(sessions["d_c"].s_sk, a.s_pk, a_ctx)
    b_sh, s_sh, pairs, complaints = proto.parse_unmask(body, {"d_a", "d_b", "d_c"}, {"d_d"}, "d_a")
    assert set(b_sh) == {"d_a", "d_b"} and s_sh == {} and set(pairs) == {"d_c", "d_d"}

    b = sessions["d_b"]  # d_c's share to d_b altered on the way: the signature no longer verifies
    inbox = inbox_of("d_b")
    inbox[1]["ct"] = sm.b64(garbage)
    b.receive_shares({"u2": ids, "shares": inbox})
    assert b.no_share == {"d_c": "bad_signature", "d_d": "bad_key"}
    body = b.unmask_body(["d_a", "d_b", "d_c"])
    assert body["complaints"]["d_c"] == "bad_signature" and set(body["pair_seeds"]) == {"d_d"}


def test_new_reasons_are_declared() -> None:
    assert REASONS["secagg_bad_key"] == 400 and REASONS["secagg_duplicate_key"] == 409


# ====================================================================== attacks on a real server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = secagg_server(tmp_path_factory.mktemp("attacks"), N, LONG)
    yield s
    s.stop()


def _checked_in(srv: ServerProcess, seed: int, transports: dict[int, Any] | None = None) -> list[Runner]:
    """N devices admitted to one round (in order), each with its SecAggSession open (nothing sent yet)."""
    runners = [Runner(srv, seed + i, (transports or {}).get(i)) for i in range(N)]
    for r in runners:
        assert r.dev.checkin() is not None
    rid = runners[0].dev.task.round_id
    assert all(r.dev.task.round_id == rid for r in runners)
    for r in runners:
        task, hook = r.dev.task, r.dev.secagg
        hook.register(r.dev.api)
        r.session = SecAggSession(task.secure_aggregation, r.dev.device_id, hook.identity, hook.pins, 2, task.deadline)
    return runners


def _advertise_now(r: Runner, c_pk: bytes | None = None, s_pk: bytes | None = None) -> dict[str, Any]:
    """POST advertise_keys (signed by the device) without waiting for the stage; ServerError if refused."""
    s = r.session
    c_pk, s_pk = c_pk or s.c_pk, s_pk or s.s_pk
    sig = s.identity.sign(sm.advertise_message(s.session, s.rid, s.me, c_pk, s_pk))
    return r.dev.api.post_json(s.urls["advertise_keys"], {"c_pk": sm.b64(c_pk), "s_pk": sm.b64(s_pk),
                                                          "signature": sm.b64(sig)})


def _keys(r: Runner) -> None:
    """Runner.keys for a device whose session is already open (_checked_in)."""
    s, api = r.session, r.dev.api
    s.advertise(api)
    s.receive_keys(s.wait_stage(api, s.urls["advertise_keys"]))
    s.share(api, wait_next=True)


def _finish_honest(srv: ServerProcess, honest: list[Runner], rid: int) -> dict[str, Any]:
    """The honest devices upload and unmask; the round closes with exactly their sum. The round's view."""
    _in_parallel([r.upload_and_finish for r in honest])
    for r in honest:
        assert r.error is None, r.error
    r = srv.wait_round(rid, timeout=30)
    assert r["state"] == "closed", r
    want = sum(x.session.quantized for x in honest)  # the server's integer sum is exactly theirs
    assert r["secure_aggregation"]["sum_sha256"] == hashlib.sha256(want.astype("<i8").tobytes()).hexdigest()
    return r


def _offenders(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["device_id"]: o for o in r["secure_aggregation"].get("offenders", [])}


def _close(runners: list[Runner]) -> None:
    for x in runners:
        x.dev.close()


@pytest.mark.parametrize("which", ["c_pk", "s_pk"])
def test_low_order_key_is_refused_at_advertise(srv: ServerProcess, which: str) -> None:
    runners = _checked_in(srv, 1000 + (50 if which == "s_pk" else 0))
    rid = runners[0].dev.task.round_id
    cheat, honest = runners[5], runners[:5]
    low = sorted(sm.X25519_LOW_ORDER)[2]
    with pytest.raises(ServerError) as err:
        _advertise_now(cheat, **{which: low})
    assert (err.value.status, err.value.reason) == (400, "secagg_bad_key")
    with pytest.raises(ServerError) as err:  # out of the round: valid keys are not taken afterwards either
        _advertise_now(cheat)
    assert err.value.reason == "round_closed"
    _in_parallel([lambda r=r: _keys(r) for r in honest])  # the stage closes once the other five advertised
    r = _finish_honest(srv, honest, rid)
    assert r["secure_aggregation"]["n_u1"] == 5
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id]
    assert got[cheat.dev.device_id]["reason"] == "secagg_bad_key" and which in got[cheat.dev.device_id]["detail"]
    _close(runners)


def test_duplicate_keys_are_refused_at_advertise(srv: ServerProcess) -> None:
    """A device advertises another device's key (copied, or two colluding devices sharing keys): the later
    one is refused, whichever of its two keys repeats either of the earlier device's."""
    runners = _checked_in(srv, 1100)
    rid = runners[0].dev.task.round_id
    victim, cheat, honest = runners[0], runners[5], runners[:5]
    assert _advertise_now(victim)["status"] == "accepted"
    with pytest.raises(ServerError) as err:
        _advertise_now(cheat, s_pk=victim.session.c_pk)  # its own c_pk, the victim's c_pk as its s_pk
    assert (err.value.status, err.value.reason) == (409, "secagg_duplicate_key")
    assert victim.dev.device_id in err.value.detail
    _in_parallel([lambda r=r: _keys(r) for r in honest])  # the victim's repeat of the same keys is accepted
    r = _finish_honest(srv, honest, rid)
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id] and got[cheat.dev.device_id]["reason"] == "secagg_duplicate_key"
    # the admin's round view names it; the devices' own view of the round does not
    assert "offenders" not in victim.dev.api.get_json(f"/v1/rounds/{rid}/secagg")
    _close(runners)


def _garbage_shares(r: Runner, sign: bool = True) -> None:
    """Advertise honestly, then send every neighbour a ciphertext of the right size that decrypts to nothing,
    signed (so that the server relays it) unless told otherwise. Its own share of b is a real one."""
    s, api = r.session, r.dev.api
    s.advertise(api)
    s.receive_keys(s.wait_stage(api, s.urls["advertise_keys"]))
    shares = []
    for v in s.graph[s.me]:
        ct = os.urandom(12 + 16 + 2 * sm.SHARE_BYTES + 40)
        sig = s.identity.sign(sm.share_message(s.ctx, s.me, v, ct if sign else ct[::-1]))
        shares.append({"to": v, "ct": sm.b64(ct), "sig": sm.b64(sig)})
    xs = [s.index[v] for v in s.graph[s.me]] + [s.index[s.me]]
    own = s.index[s.me]
    s.own_shares = (sm.shamir_split(sm.secret_to_int(s.s_sk), xs, s.t)[own],
                    sm.shamir_split(sm.secret_to_int(s.b), xs, s.t)[own])
    api.post_json(s.urls["share_keys"], {"shares": shares, "b_commitment": sm.commitment(s.session, s.rid, s.me, s.b)})


def test_garbage_share_ciphertexts_do_not_stop_honest_devices(srv: ServerProcess) -> None:
    """The cheater's shares fail to decrypt at every holder: each holds no share of it and goes on (before,
    each stopped and the round was lost). It then leaves; its pairwise masks are removed with the seeds its
    neighbours reveal (its mask key cannot be rebuilt), and all five name it."""
    runners = _checked_in(srv, 1200)
    rid = runners[0].dev.task.round_id
    cheat, honest = runners[5], runners[:5]
    _in_parallel([lambda r=r: _keys(r) for r in honest] + [lambda: _garbage_shares(cheat)])
    assert cheat.session.leave(cheat.dev.api, "cancelled")  # a cheater that then drops out
    r = _finish_honest(srv, honest, rid)
    for x in honest:
        assert x.session.no_share == {cheat.dev.device_id: "bad_share"}
    info = r["secure_aggregation"]
    assert info["n_u2"] == N and info["n_u3"] == 5 and info["dropped_recovered"] == [cheat.dev.device_id]
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id]
    assert got[cheat.dev.device_id]["reason"] == "secagg_bad_share_ciphertext"
    assert got[cheat.dev.device_id]["reported_by"] == sorted(x.dev.device_id for x in honest)
    _close(runners)


def test_garbage_shares_then_a_masked_input_is_taken_out_of_the_sum(srv: ServerProcess) -> None:
    """The cheater's signed shares decrypt at no holder, and it then uploads a masked input and goes on as
    the others do. Its self-mask cannot be rebuilt (no t shares exist): its holders reveal the pairwise
    seed each used with it (its own signature proves it at fault), the server subtracts its masked input
    (kept until the round closes) and the round ends with exactly the honest five's sum; it is named and
    not counted as a contributor."""
    runners = _checked_in(srv, 1300)
    rid = runners[0].dev.task.round_id
    cheat, honest = runners[5], runners[:5]
    _in_parallel([lambda r=r: _keys(r) for r in honest] + [lambda: _garbage_shares(cheat)])
    goes_on = threading.Thread(target=cheat.upload_and_finish, daemon=True)
    goes_on.start()
    r = _finish_honest(srv, honest, rid)
    goes_on.join(30)
    assert cheat.error is None, cheat.error  # nothing in the protocol stopped it: only its input is out
    info = r["secure_aggregation"]
    assert info["n_u3"] == N and info["removed"] == [cheat.dev.device_id] and info["dropped_recovered"] == []
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id]
    assert got[cheat.dev.device_id]["reason"] == "secagg_bad_share_ciphertext"
    assert "taken out of the sum" in got[cheat.dev.device_id]["detail"]
    assert r["accepted"] == 5
    _close(runners)


def test_unsigned_shares_are_refused_and_the_sender_is_out(srv: ServerProcess) -> None:
    """Shares whose signatures do not verify are refused at once (the relay only forwards what a holder can
    pin on its sender); the sender is out of the round and named, and the stage does not wait for it."""
    runners = _checked_in(srv, 1350)
    rid = runners[0].dev.task.round_id
    cheat, honest = runners[5], runners[:5]
    refused: dict[str, ServerError] = {}

    def cheat_shares() -> None:
        try:
            _garbage_shares(cheat, sign=False)
        except ServerError as exc:
            refused["err"] = exc

    _in_parallel([lambda r=r: _keys(r) for r in honest] + [cheat_shares])
    assert (refused["err"].status, refused["err"].reason) == (400, "bad_signature")
    r = _finish_honest(srv, honest, rid)
    assert r["secure_aggregation"]["n_u2"] == 5
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id] and got[cheat.dev.device_id]["reason"] == "secagg_bad_share_signature"
    _close(runners)


def test_a_bad_revealed_share_leaves_out_the_revealer_not_the_round(srv: ServerProcess) -> None:
    """One device alters every share it reveals at unmasking (before: the reconstructed seed missed its
    commitment and the round was abandoned). Its shares are left out, the others' rebuild every seed, and
    the sum is exact (its own masked input is a valid part of it); it is named."""
    liar = {"i": -1}

    def hook_for(i: int):
        def alter(path: str, method: str, body: bytes) -> bytes | None:
            if i != liar["i"] or method != "POST" or not path.endswith("/secagg/unmasking"):
                return None
            data = json.loads(body)
            for v, share in data["b_shares"].items():
                raw = bytearray(base64.b64decode(share))
                raw[-1] ^= 0x01
                data["b_shares"][v] = base64.b64encode(bytes(raw)).decode()
            return json.dumps(data).encode()
        return alter

    transports = {i: TamperTransport(request_hook=hook_for(i)) for i in range(N)}
    runners = _checked_in(srv, 1400, transports)
    rid = runners[0].dev.task.round_id
    # the liar holds share point 1 (the first device id): its shares are among the first t used
    liar["i"] = min(range(N), key=lambda i: runners[i].dev.device_id)
    _in_parallel([lambda r=r: _keys(r) for r in runners])
    r = _finish_honest(srv, runners, rid)
    got = _offenders(r)
    cheat = runners[liar["i"]].dev.device_id
    assert list(got) == [cheat] and got[cheat]["reason"] == "secagg_bad_revealed_share"
    _close(runners)


@pytest.mark.parametrize("how", ["wider_ring", "num_examples"])
def test_an_out_of_range_masked_input_is_refused_at_upload(srv: ServerProcess, how: str) -> None:
    """A masked input of 64-bit words in a 32-bit round (values beyond the ring: shape_mismatch), or one whose
    metadata is out of range (bad_metadata), is refused at upload; the device is out of the round (a dropout:
    its masks are removed with its rebuilt mask key), the stage stops waiting for it, and it is named."""
    runners = _checked_in(srv, 1500 + (50 if how == "num_examples" else 0))
    rid = runners[0].dev.task.round_id
    cheat, honest = runners[5], runners[:5]
    _in_parallel([lambda r=r: _keys(r) for r in runners])
    s = cheat.session
    s.receive_shares(s.wait_stage(cheat.dev.api, s.urls["share_keys"]))
    assert s.q.bits == 32
    if how == "wider_ring":
        wide = np.full(_delta(0).size, np.uint64(1) << np.uint64(40))
        blob = sm.encode_masked(wide, round_id=s.rid, session=s.session, device_id=s.me, bits=64,
                                metadata={"num_examples": 1, "metrics": {}})
    else:
        blob = s.masked_blob(_delta(0), {"num_examples": 10 ** 12, "metrics": {}}, None)
    want = {"wider_ring": "shape_mismatch", "num_examples": "bad_metadata"}[how]
    with pytest.raises(SecAggError) as err:
        s.post_masked(cheat.dev.api, blob)
    assert err.value.reason == want
    r = _finish_honest(srv, honest, rid)
    assert r["secure_aggregation"]["dropped_recovered"] == [cheat.dev.device_id]
    got = _offenders(r)
    assert list(got) == [cheat.dev.device_id] and got[cheat.dev.device_id]["reason"] == "secagg_bad_masked_input"
    assert got[cheat.dev.device_id]["detail"].startswith(want)
    _close(runners)
