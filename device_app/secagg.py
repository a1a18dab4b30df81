"""The secure-aggregation hook of the device client, and its two implementations.

Past 500 lines on purpose: SecAggSession's stages (keys, shares, masked input, consistency,
unmasking) share one round's secrets and peer state, and splitting them would pass those secrets
between modules; the math itself is in models/secagg_math.py.

When a training task carries secure-aggregation parameters (the server asks that updates be
protected so it only ever sees their sum), the client hands its privatized delta to a
SecureAggregation implementation instead of uploading it in the clear. A client with no
implementation that accepts the task's parameters declines the round (outcome
"secagg_unsupported") rather than upload an unmasked delta the server did not ask for.

The hook interface (the SecureAggregation Protocol; every hook implements all of it, and the
client, through device_app/uploads.py, calls each step in order):

    name, should_stop                                  the protocol's name; polled between stages (None: never)
    supports(params) -> bool                           whether it runs the protocol the task describes
    begin(api, task)                                   before local training (SecAgg's key stages)
    submit(api, task, tensors, metadata) -> answer     protect AND upload (and finish the protocol)
    abort(api, task)                                   the device dropped out of the round before submit

A SecAgg device that gives up on a round (any SecAggError of its own, training stopped, dropped out)
tells the server (POST .../secagg/abort {reason}, best effort), so that a round that can no longer reach
its threshold is abandoned at once instead of at its deadline. A device waiting on a stage learns that
its round was abandoned at its next poll (409 round_closed, with the reason).

Implementations here:

SecAggHook (protocol "secagg", Bonawitz et al. 2017; math in models/secagg_math.py)
    begin:  register the device's Ed25519 identity key (once), advertise two fresh X25519 keys signed
            with it, wait for the cohort U1, verify every peer's signature (and pin peers' identity keys:
            trust on first use), check the threshold is a strict majority and the cohort is big enough,
            Shamir-share the mask key and a fresh self-mask seed, upload the shares AES-GCM-encrypted
            to each neighbour (the server relays what it cannot read).
    submit: after training: fetch and decrypt the shares sent to it (a share that fails, from a cheating
            peer or altered in transit, does not stop the device: it holds no share of that peer, names it
            in its unmasking message, and the other holders' shares do the work), quantize (stochastic
            rounding, models/secagg_math.py), mask, upload the masked vector; then sign the survivor set
            U3, wait for t signatures on the same U3, and reveal exactly one share per peer: b_v for
            survivors, s_sk_v for dropouts (a share it never got: complaints, and the pairwise seed).
PaillierHook (protocol "paillier", models/paillier_pack.py)
    submit: check the key holder's signature on the public key (against pinned key-holder keys, or the
            one first seen), quantize, pack 63 values per plaintext, encrypt, upload the ciphertexts.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from models import secagg_math as sm  # cryptography itself only once a round needs a key or a cipher

if TYPE_CHECKING:
    from models import paillier_pack as pp  # phe + gmpy2: imported by PaillierHook when a Paillier round comes

log = logging.getLogger("device_app.secagg")


@runtime_checkable
class SecureAggregation(Protocol):
    """Protects one device's update for a secure-aggregation round, and uploads it."""

    name: str
    # Polled between the protocol's stages: a stopping device leaves the round like a dropout. None:
    # never; DeviceClient sets its cancel flag on hooks that have none.
    should_stop: Callable[[], bool] | None

    def supports(self, params: dict[str, Any]) -> bool:
        """Whether this implementation can run the protocol the server described."""
        ...

    def begin(self, api: Any, task: Any) -> object:
        """The stages before local training (SecAgg: key exchange and secret sharing through `api`)."""
        ...

    def submit(self, api: Any, task: Any, tensors: Sequence[np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
        """Protect the privatized delta, upload it and finish the protocol; the server's answer plus
        "bytes" (and "timings"). SecAggError when the protocol cannot go on."""
        ...

    def abort(self, api: Any, task: Any) -> None:
        """The device left the round after begin() (training stopped, dropped out): forget its secrets."""
        ...


def choose(hooks: Sequence[SecureAggregation], params: dict[str, Any] | None) -> SecureAggregation | None:
    """The first hook that supports `params` (None when params is empty or nothing fits)."""
    if not params:
        return None
    for hook in hooks:
        if hook.supports(params):
            return hook
    return None


class SecAggError(Exception):
    """The protocol cannot go on for this device (`reason` is machine-readable); nothing more is sent."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# =========================================================================== identity and pins


class DeviceIdentity:
    """The device's long-term Ed25519 identity key: signs its round keys and its consistency check.
    Stored raw in a 0600 file when a path is given; registered once with the server."""

    def __init__(self, private: bytes) -> None:
        self.private = private
        self.public = sm.ed25519_public(private)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike | None = None) -> "DeviceIdentity":
        if path is None:
            return cls(sm.ed25519_keypair()[0])
        path = Path(path)
        if path.exists():
            return cls(bytes.fromhex(path.read_text().strip()))
        private, _ = sm.ed25519_keypair()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private.hex())
        os.replace(tmp, path)
        return cls(private)

    def sign(self, message: bytes) -> bytes:
        return sm.sign(self.private, message)


class PeerPins:
    """Trust on first use: the identity key first seen for each peer; a different one later is refused."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.keys: dict[str, str] = {}
        if self.path and self.path.exists():
            try:
                self.keys = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.keys = {}

    def check(self, pins: dict[str, str]) -> None:
        with self._lock:
            for device_id, key in pins.items():
                known = self.keys.get(device_id)
                if known is not None and known != key:
                    raise SecAggError("identity_changed", f"peer {device_id} presents a different identity key than "
                                                          "before (impersonation?)")
            new = {d: k for d, k in pins.items() if d not in self.keys}
            if new:
                self.keys.update(new)
                if self.path:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self.keys, sort_keys=True))
                    os.replace(tmp, self.path)


# =========================================================================== SecAgg device session


POLL_S = 20.0  # longest single long-poll (the server caps it too)
LEAVE_TIMEOUT_S = 5.0  # telling the server the device left is a courtesy: never wait long for it
# server answers that mean the round is over for this device already: nothing to tell the server then
_SERVER_ENDED = frozenset({"round_closed", "unknown_round", "not_admitted", "unauthorized"})


def _wait(api: Any, url: str, give_up: float, poll_s: float = POLL_S,
          should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Long-poll a stage until it is ready; SecAggError if the round failed, time ran out or the device
    stopped (should_stop, checked between polls)."""
    from device_app.http_client import Offline, ServerError

    while True:
        _check_stop(should_stop)
        remaining = give_up - time.time()
        if remaining <= 0:
            raise SecAggError("timeout", f"{url}: the stage did not close in time")
        try:
            answer = api.get_json(url, params={"wait": min(poll_s, max(0.0, remaining))},
                                  timeout=min(poll_s, remaining) + 15.0)
        except ServerError as exc:
            raise SecAggError(exc.reason, exc.detail) from None
        except Offline:
            time.sleep(min(0.5, max(0.0, give_up - time.time())))
            continue
        if answer.get("ready"):
            return answer


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise SecAggError("cancelled", "the device stopped (the app is closing); it drops out of the round")


class SecAggSession:
    """One device's side of one SecAgg round (all secrets in memory only, dropped with the session)."""

    def __init__(self, params: dict[str, Any], device_id: str, identity: DeviceIdentity, pins: PeerPins,
                 min_participants: int = 3, deadline: float | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.params = params
        self.should_stop = should_stop
        self.rid = int(params["round_id"])
        self.session = str(params["session"])
        self.me = device_id
        self.identity = identity
        self.pins = pins
        self.q = sm.Quantization.from_dict(params["quantization"])
        self.urls = params["urls"]
        self.ctx = sm.round_context(self.session, self.rid)
        self.min_participants = max(int(min_participants), int(params.get("min_participants", 2)))
        stage_s = float(params.get("stage_timeout_s", 60.0))
        self.give_up = max(deadline or 0.0, time.time()) + 6 * stage_s + 30.0
        self.c_sk, self.c_pk = sm.x25519_keypair()
        self.s_sk, self.s_pk = sm.x25519_keypair()
        self.b = os.urandom(sm.KEY_BYTES)
        self.participants: dict[str, dict[str, Any]] = {}
        self.index: dict[str, int] = {}
        self.graph: dict[str, list[str]] = {}
        self.t = 0
        self.own_shares: tuple[int, int] | None = None  # my own (s, b) share
        self.held: dict[str, tuple[int, int]] = {}  # peer -> (share of its s_sk, share of its b)
        # peers whose share this device does not hold (its ciphertext failed to decrypt, was missing, or the
        # key agreement with it failed) -> why: a cheating peer, or the relay altered it. Not a reason to
        # stop: the other holders' shares rebuild its secrets, and the unmasking message names it.
        self.no_share: dict[str, str] = {}
        self.u2: list[str] = []
        self.u3: list[str] = []
        self.quantized: np.ndarray | None = None
        self.masked_sha256: str | None = None
        self.timings: dict[str, float] = {}
        # Called with the URL just before each message is posted (benchmarks hold every device there
        # until all have computed theirs: see device_app.privacy_sim.Lockstep).
        self.before_post: Callable[[str], None] | None = None
        self._next: dict[str, dict[str, Any]] = {}  # url -> stage view the server sent with a message's answer

    def _timed(self, key: str, t0: float) -> None:
        """CPU seconds of this thread since t0 (thread_time: waiting for the GIL or the network is not counted)."""
        self.timings[key] = self.timings.get(key, 0.0) + time.thread_time() - t0

    # ------------------------------------------------------------------ advertise + share (before training)
    def advertise(self, api: Any) -> None:
        t0 = time.thread_time()
        sig = self.identity.sign(sm.advertise_message(self.session, self.rid, self.me, self.c_pk, self.s_pk))
        self._post(api, self.urls["advertise_keys"],
                   {"c_pk": sm.b64(self.c_pk), "s_pk": sm.b64(self.s_pk), "signature": sm.b64(sig)}, wait_next=True)
        self._timed("advertise_compute_s", t0)

    def _wait_options(self) -> dict[str, Any]:
        wait = min(POLL_S, max(0.0, self.give_up - time.time()))
        return {"params": {"wait": wait}, "timeout": wait + 15.0}

    def _keep_next(self, url: str, answer: dict[str, Any]) -> dict[str, Any]:
        nxt = answer.get("next")
        if isinstance(nxt, dict) and nxt.get("ready"):
            self._next[url] = nxt
        return answer

    def _post(self, api: Any, url: str, body: dict[str, Any], wait_next: bool = False) -> dict[str, Any]:
        """POST a message; with wait_next the server holds the answer until the stage's view is ready and
        sends it along (one round trip per stage instead of a POST and a long-poll GET)."""
        from device_app.http_client import ServerError

        if self.before_post is not None:
            self.before_post(url)
        try:
            return self._keep_next(url, api.post_json(url, body, **(self._wait_options() if wait_next else {})))
        except ServerError as exc:
            raise SecAggError(exc.reason, exc.detail) from None

    def post_masked(self, api: Any, blob: bytes, announce: bool = True) -> dict[str, Any]:
        """Upload the masked vector (the answer carries the survivor set once the stage closed);
        announce=False for a retry of the same bytes (before_post already ran for them)."""
        from device_app.http_client import ServerError

        url = self.urls["masked_input"]
        if announce and self.before_post is not None:
            self.before_post(url)
        try:
            return self._keep_next(url, api.post_bytes(url, blob, **self._wait_options()))
        except ServerError as exc:
            raise SecAggError(exc.reason, exc.detail) from None

    def leave(self, api: Any, reason: str) -> bool:
        """Tell the server this device left the round (best effort, short timeout); True if it heard."""
        from device_app.http_client import Offline, ServerError

        url = self.urls.get("abort")
        if not url or reason in _SERVER_ENDED:
            return False  # a server without the route, or one that ended the round for this device
        try:
            api.post_json(url, {"reason": (reason or "unspecified")[:64]}, timeout=LEAVE_TIMEOUT_S)
        except (Offline, ServerError) as exc:
            log.debug("round %d: could not report leaving (%s)", self.rid, exc)
            return False
        return True

    def wait_stage(self, api: Any, url: str) -> dict[str, Any]:
        """The stage view for `url`: the one the server sent with the message's answer, else long-poll."""
        _check_stop(self.should_stop)  # a stopping device leaves at the next stage, like a dropout
        nxt = self._next.pop(url, None)
        return nxt if nxt is not None else _wait(api, url, self.give_up, should_stop=self.should_stop)

    def receive_keys(self, answer: dict[str, Any]) -> None:
        """Verify the cohort the server announces: the keys of every device this one will mask with or
        share secrets with (its neighbours) must be signed by that device's identity key; identity keys
        must match the ones pinned before (trust on first use).

        A peer whose share key is unusable (low order, non-canonical) is a dropped holder, like a bad share
        (receive_shares). Anything else here stops the device: the server verifies every advertised
        signature and refuses low-order or repeated keys (server/secagg/dropouts.py), so a peer cannot cause
        it; it means the relay altered the cohort, and going on would mask with keys the relay may hold."""
        t0 = time.thread_time()
        if answer.get("session") != self.session:
            raise SecAggError("bad_keys", "key list is for another session")
        plist = answer.get("participants") or []
        ids = [p.get("device_id") for p in plist]
        if len(set(ids)) != len(ids) or self.me not in ids:
            raise SecAggError("bad_keys", "the cohort repeats a device or leaves this device out")
        order = sorted(ids)
        position = {u: i + 1 for i, u in enumerate(order)}
        if len(order) < self.min_participants:
            raise SecAggError("cohort_too_small", f"{len(order)} devices; this device needs at least "
                                                  f"{self.min_participants}")
        if int(answer.get("neighbors", 0)) != int(self.params.get("neighbors", 0)):
            raise SecAggError("bad_keys", "neighbour graph differs from the task's")
        graph = sm.neighbours(order, int(self.params.get("neighbors", 0)), str(answer.get("graph_seed") or ""))
        mine = set(graph[self.me]) | {self.me}
        pins = {}
        seen_keys = set()
        for p in plist:
            u = p["device_id"]
            try:
                ident = sm.unb64(p.get("identity_key") or "", 32)
                c_pk, s_pk = sm.unb64(p["c_pk"], 32), sm.unb64(p["s_pk"], 32)
                sig = sm.unb64(p["signature"], 64)
            except (sm.SecAggMathError, KeyError) as exc:
                raise SecAggError("bad_keys", f"participant {u}: {exc}") from None
            if int(p.get("index", -1)) != position[u]:
                raise SecAggError("bad_keys", f"participant {u} has the wrong share index")
            if c_pk in seen_keys or s_pk in seen_keys or c_pk == s_pk:
                raise SecAggError("bad_keys", f"participant {u} reuses keys")
            if sm.x25519_key_problem(s_pk):  # no mask can be agreed with it: the sum could not cancel
                raise SecAggError("bad_keys", f"participant {u}'s mask key is {sm.x25519_key_problem(s_pk)}")
            if sm.x25519_key_problem(c_pk):  # no share can go to or come from it: a dropped holder
                self.no_share[u] = "bad_key"
            seen_keys.update((c_pk, s_pk))
            if u in mine and not sm.verify(ident, sig, sm.advertise_message(self.session, self.rid, u, c_pk, s_pk)):
                raise SecAggError("bad_signature", f"keys of participant {u} are not signed by its identity key")
            if u == self.me and (c_pk, s_pk, ident) != (self.c_pk, self.s_pk, self.identity.public):
                raise SecAggError("bad_keys", "the server announced other keys for this device")
            pins[u] = sm.b64(ident)
            self.participants[u] = {"c_pk": c_pk, "s_pk": s_pk, "identity": ident}
        self.pins.check({u: k for u, k in pins.items() if u != self.me})
        self.index = position
        self.graph = graph
        holders = min(len(v) for v in self.graph.values()) + 1
        t = int(answer.get("threshold", 0))
        want = sm.threshold_for(holders, float(self.params.get("threshold_fraction", 2 / 3)))
        if t != want or t <= holders // 2:
            raise SecAggError("bad_threshold", f"threshold {t} for {holders} holders (expected {want}, and a strict "
                                               "majority)")
        self.t = t
        self._timed("verify_keys_s", t0)

    def share(self, api: Any, wait_next: bool = False) -> None:
        """Send the encrypted shares; wait_next when nothing else is to be done before the others have
        (a device that trains next does not wait)."""
        t0 = time.thread_time()
        mine = self.graph[self.me]
        xs = [self.index[v] for v in mine] + [self.index[self.me]]
        s_shares = sm.shamir_split(sm.secret_to_int(self.s_sk), xs, self.t)
        b_shares = sm.shamir_split(sm.secret_to_int(self.b), xs, self.t)
        self.own_shares = (s_shares[self.index[self.me]], b_shares[self.index[self.me]])
        out = []
        for v in mine:
            try:
                if v in self.no_share:
                    raise sm.SecAggMathError(self.no_share[v])
                key = sm.share_key(self.c_sk, self.participants[v]["c_pk"], self.ctx)
            except sm.SecAggMathError as exc:  # v's key is unusable: it gets no share (one holder fewer)
                self.no_share.setdefault(v, "key_agreement_failed")
                log.warning("round %d: no share for %s: %s", self.rid, v, exc)
                ct = os.urandom(12 + 16 + 2 * sm.SHARE_BYTES + 64)
            else:
                ct = sm.encrypt_shares(key, self.ctx, self.me, v, s_shares[self.index[v]], b_shares[self.index[v]])
            sig = self.identity.sign(sm.share_message(self.ctx, self.me, v, ct))
            out.append({"to": v, "ct": sm.b64(ct), "sig": sm.b64(sig)})
        body = {"shares": out, "b_commitment": sm.commitment(self.session, self.rid, self.me, self.b)}
        self._timed("share_compute_s", t0)
        self._post(api, self.urls["share_keys"], body, wait_next=wait_next)

    def begin(self, api: Any) -> None:
        self.advertise(api)
        self.receive_keys(self.wait_stage(api, self.urls["advertise_keys"]))
        self.share(api)

    # ------------------------------------------------------------------ after training
    def receive_shares(self, answer: dict[str, Any]) -> None:
        t0 = time.thread_time()
        u2 = list(answer.get("u2") or [])
        if self.me not in u2 or not set(u2) <= set(self.index) or len(u2) < self.t:
            raise SecAggError("bad_u2", "the set of devices that shared keys is inconsistent")
        got = {s.get("from"): s for s in answer.get("shares") or [] if isinstance(s, dict)}
        for v in self.graph[self.me]:
            if v not in u2 or v in self.no_share:
                continue
            # A share that is missing or fails is not a reason to stop: v is treated as a dropped holder.
            # This device holds no share of v's secrets; the other holders' shares rebuild them, and the
            # unmasking message names v (complaints). Whose doing it was decides what is revealed
            # (unmask_body): under v's own signature it was v's; otherwise the relay's.
            self.no_share[v] = "missing_share"
            try:
                ct, sig = sm.unb64(str(got[v]["ct"])), sm.unb64(str(got[v]["sig"]), 64)
                if not sm.verify(self.participants[v]["identity"], sig, sm.share_message(self.ctx, v, self.me, ct)):
                    self.no_share[v] = "bad_signature"
                    raise sm.SecAggMathError("the share is not signed by its sender (altered on the way)")
                key = sm.share_key(self.c_sk, self.participants[v]["c_pk"], self.ctx)
                self.no_share[v] = "bad_share"
                self.held[v] = sm.decrypt_shares(key, self.ctx, v, self.me, ct)
                del self.no_share[v]
            except (KeyError, sm.SecAggMathError) as exc:
                log.warning("round %d: share from %s unusable (%s): %s", self.rid, v, self.no_share[v], exc)
        self.u2 = sorted(u2)
        self._timed("decrypt_shares_s", t0)

    def masked_blob(self, flat: np.ndarray, metadata: dict[str, Any], rng: np.random.Generator | None) -> bytes:
        t0 = time.thread_time()
        q = sm.quantize(flat, self.q, rng)
        self.quantized = q
        peers = {v: self.participants[v]["s_pk"] for v in self.graph[self.me] if v in self.u2}
        y = sm.mask(sm.to_ring(q, self.q.bits), self.q.bits, self.me, self.b, self.s_sk, peers, self.ctx)
        blob = sm.encode_masked(y, round_id=self.rid, session=self.session, device_id=self.me, bits=self.q.bits,
                                metadata=metadata)
        self._timed("mask_s", t0)
        return blob

    def finish(self, api: Any) -> None:
        """Consistency check and unmasking (after the masked input was accepted)."""
        answer = self.wait_stage(api, self.urls["masked_input"])
        u3 = sorted(answer.get("u3") or [])
        if self.me not in u3 or not set(u3) <= set(self.u2) or len(u3) < self.t:
            raise SecAggError("bad_u3", "the survivor set is inconsistent (or leaves this device out)")
        self.u3 = u3
        t0 = time.thread_time()
        msg = sm.consistency_message(self.session, self.rid, u3)
        signature = sm.b64(self.identity.sign(msg))
        self._timed("consistency_compute_s", t0)
        self._post(api, self.urls["consistency"], {"signature": signature}, wait_next=True)
        answer = self.wait_stage(api, self.urls["consistency"])
        t0 = time.thread_time()
        if sorted(answer.get("u3") or []) != u3:
            raise SecAggError("inconsistent_u3", "the server showed other devices another survivor set")
        valid = set()
        for s in answer.get("signatures") or []:
            if len(valid) >= self.t:  # t valid signatures on this U3 are all it takes
                break
            u = s.get("device_id")
            if u in u3 and u not in valid:
                try:
                    if sm.verify(self.participants[u]["identity"], sm.unb64(s.get("signature", ""), 64), msg):
                        valid.add(u)
                except sm.SecAggMathError:
                    pass
        if len(valid) < self.t:
            raise SecAggError("inconsistent_u3", f"only {len(valid)} valid signatures on the survivor set, "
                                                 f"{self.t} needed")
        body = self.unmask_body(u3)
        self._timed("unmask_compute_s", t0)
        self._post(api, self.urls["unmasking"], body)

    def unmask_body(self, u3: Sequence[str]) -> dict[str, Any]:
        """What this survivor reveals: its share of b_v for survivors v, of s_sk_v for dropped v, never both
        for one device. A share it never got (no_share) is listed in complaints instead, and the one pairwise
        seed s_uv it masked with is revealed, so the server can remove that mask without v's secrets:
        - for a dropped v (not in U3: this reveals nothing of a survivor's input);
        - for a surviving v only when v itself is at fault (sm.SENDER_FAULTS: a ciphertext under v's own
          signature that does not decrypt, or a key v signed that no share can be agreed with), so that
          the server can take v's masked input out of the sum. An honest v never signs such a thing and
          the relay cannot forge v's signature: an honest survivor's pairwise seeds are never revealed."""
        b_shares, s_shares, pair_seeds, complaints = {}, {}, {}, {}
        dropped = set(self.u2) - set(u3)
        for v in u3:
            if v == self.me:
                b_shares[v] = sm.b64(sm.share_to_bytes(self.own_shares[1]))
            elif self.me in self.graph[v]:
                if v in self.held:
                    b_shares[v] = sm.b64(sm.share_to_bytes(self.held[v][1]))
                else:
                    complaints[v] = self.no_share.get(v, "missing_share")
                    if complaints[v] in sm.SENDER_FAULTS:
                        pair_seeds[v] = sm.b64(sm.mask_seed(self.s_sk, self.participants[v]["s_pk"], self.ctx))
        for v in dropped:
            if self.me in self.graph[v]:
                if v in self.held:
                    s_shares[v] = sm.b64(sm.share_to_bytes(self.held[v][0]))
                else:
                    complaints[v] = self.no_share.get(v, "missing_share")
                    pair_seeds[v] = sm.b64(sm.mask_seed(self.s_sk, self.participants[v]["s_pk"], self.ctx))
        assert not set(b_shares) & set(s_shares)  # never both secrets of one device
        body: dict[str, Any] = {"b_shares": b_shares, "s_shares": s_shares}
        if complaints:
            body.update(complaints=complaints, pair_seeds=pair_seeds)
        return body


class SecAggHook:
    """SecAgg for DeviceClient (and for tests/benchmarks driving sessions directly)."""

    name = "secagg"

    def __init__(self, identity: DeviceIdentity | None = None, *, identity_path: str | os.PathLike | None = None,
                 pins_path: str | os.PathLike | None = None, min_participants: int = 3,
                 rng: np.random.Generator | None = None) -> None:
        self._identity = identity
        self._identity_path = identity_path
        self._pins_path = pins_path
        self._pins: PeerPins | None = None
        self.min_participants = min_participants
        self.rng = rng
        self._registered: set[tuple[str, str]] = set()
        self.should_stop: Callable[[], bool] | None = None  # DeviceClient: its cancel flag
        self.sessions: dict[int, SecAggSession] = {}
        self.last_session: SecAggSession | None = None

    @property
    def identity(self) -> DeviceIdentity:
        """The device's identity key, created on first use (a device never in a SecAgg round has none)."""
        if self._identity is None:
            self._identity = DeviceIdentity.load_or_create(self._identity_path)
        return self._identity

    @property
    def pins(self) -> PeerPins:
        if self._pins is None:
            self._pins = PeerPins(self._pins_path)
        return self._pins

    def supports(self, params: dict[str, Any]) -> bool:
        return (params.get("protocol") == sm.PROTOCOL and params.get("version") == sm.PROTOCOL_VERSION
                and int((params.get("quantization") or {}).get("bits", 0)) in sm.BITS)

    def register(self, api: Any) -> None:
        key = (api.base_url, api.device_id or "")
        if key in self._registered:
            return
        from device_app.http_client import ServerError

        params_url = "/v1/devices/identity"
        try:
            api.post_json(params_url, {"public_key": sm.b64(self.identity.public)})
        except ServerError as exc:
            raise SecAggError(exc.reason, exc.detail) from None
        self._registered.add(key)

    def begin(self, api: Any, task: Any) -> SecAggSession:
        self.register(api)
        params = task.secure_aggregation
        session = SecAggSession(params, api.device_id, self.identity, self.pins, self.min_participants, task.deadline,
                                should_stop=self.should_stop)
        self.sessions[session.rid] = session
        self.last_session = session
        try:
            session.begin(api)
        except SecAggError as exc:
            self.sessions.pop(session.rid, None)
            session.leave(api, exc.reason)
            raise
        return session

    def submit(self, api: Any, task: Any, tensors: Sequence[np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.get(int(task.round_id))
        if session is None:
            raise SecAggError("no_session", "begin() was not run for this round")
        try:
            session.receive_shares(session.wait_stage(api, session.urls["share_keys"]))
            flat = np.concatenate([np.asarray(t, np.float32).reshape(-1) for t in tensors])
            blob = session.masked_blob(flat, metadata, self.rng)
            answer = session.post_masked(api, blob)
            session.masked_sha256 = answer.get("payload_sha256")
            session.finish(api)
            return {**answer, "bytes": len(blob), "protocol": self.name, "timings": dict(session.timings)}
        except SecAggError as exc:
            session.leave(api, exc.reason)  # so the round does not wait for this device until its deadline
            raise
        finally:
            self.sessions.pop(int(task.round_id), None)

    def abort(self, api: Any, task: Any) -> None:
        session = self.sessions.pop(int(task.round_id), None)
        if session is not None:
            session.leave(api, "cancelled")


# =========================================================================== Paillier


class PaillierHook:
    """Encrypts the delta for the key holder (packed Paillier, models/paillier_pack.py)."""

    name = "paillier"

    def __init__(self, trusted_keyholder_keys: Sequence[str] | None = None, mode: str = "standard",
                 rng: np.random.Generator | None = None, min_key_bits: int = 2048) -> None:
        self.trusted = set(trusted_keyholder_keys or ())
        self.mode = mode
        self.rng = rng
        self.min_key_bits = min_key_bits
        self._pinned: dict[str, str] = {}  # key-holder URL -> verify key first seen
        self._encryptors: dict[tuple[str, str], pp.Encryptor] = {}
        self.last: dict[str, Any] = {}
        # One stage (submit) and no state between stages: nothing to leave early; kept for the protocol.
        self.should_stop: Callable[[], bool] | None = None

    def begin(self, api: Any, task: Any) -> None:
        """Nothing before training: the key holder's signed public key comes with the task (checked in submit)."""

    def abort(self, api: Any, task: Any) -> None:
        """Nothing to forget: no secret exists before submit."""

    def supports(self, params: dict[str, Any]) -> bool:
        from models import paillier_pack as pp

        return params.get("protocol") == pp.PROTOCOL and params.get("version") == pp.PROTOCOL_VERSION

    def _key(self, params: dict[str, Any]) -> pp.PublicKey:
        from models import paillier_pack as pp

        info = params["public_key"]
        key = pp.PublicKey.from_dict(info)
        verify_key = str(info.get("verify_key", ""))
        try:
            ok = sm.verify(sm.unb64(verify_key, 32), sm.unb64(str(info.get("signature", "")), 64),
                           key.signed_message())
        except sm.SecAggMathError:
            ok = False
        if not ok:
            raise SecAggError("bad_signature", "the Paillier public key is not signed by the key holder")
        if self.trusted:
            if verify_key not in self.trusted:
                raise SecAggError("untrusted_keyholder", "the key holder's signing key is not one this device trusts")
        else:
            url = str(params.get("keyholder_url"))
            pinned = self._pinned.setdefault(url, verify_key)
            if pinned != verify_key:
                raise SecAggError("untrusted_keyholder", "the key holder's signing key changed")
        if key.key_bits < self.min_key_bits:
            raise SecAggError("weak_key", f"{key.key_bits}-bit Paillier key (minimum {self.min_key_bits})")
        return key

    def submit(self, api: Any, task: Any, tensors: Sequence[np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
        from device_app.http_client import ServerError
        from models import paillier_pack as pp

        params = task.secure_aggregation
        key = self._key(params)
        packing = pp.Packing.from_dict(params["packing"])
        if packing.key_bits != key.key_bits:
            raise SecAggError("bad_packing", "packing does not match the key")
        mode = self.mode if (self.mode != "djn" or key.djn_hs) else "standard"
        enc = self._encryptors.get((key.key_id, mode))
        if enc is None:
            enc = self._encryptors[(key.key_id, mode)] = pp.Encryptor(key, mode)
        flat = np.concatenate([np.asarray(t, np.float32).reshape(-1) for t in tensors])
        t0 = time.perf_counter()
        cts, q = pp.encrypt_delta(flat, packing, enc, self.rng)
        seconds = time.perf_counter() - t0
        blob = pp.encode_input(cts, packing, round_id=task.round_id, key_id=key.key_id, device_id=api.device_id,
                               metadata=metadata)
        self.last = {"quantized": q, "encrypt_seconds": seconds, "ciphertexts": len(cts)}
        try:
            answer = api.post_bytes(params["upload_url"], blob)
        except ServerError as exc:
            raise SecAggError(exc.reason, exc.detail) from None
        return {**answer, "bytes": len(blob), "protocol": self.name,
                "timings": {"encrypt_s": seconds, "ciphertexts": len(cts)}}


def default_hooks(data_dir: str | os.PathLike | None = None) -> list[SecureAggregation]:
    """The hooks a DeviceClient uses unless told otherwise (identity key and pins in its data dir)."""
    d = Path(data_dir) if data_dir else None
    return [SecAggHook(identity_path=(d / "identity_ed25519.key") if d else None,
                       pins_path=(d / "peer_identity_pins.json") if d else None),
            PaillierHook()]


__all__ = ["SecureAggregation", "choose", "SecAggError", "DeviceIdentity", "PeerPins", "SecAggSession",
           "SecAggHook", "PaillierHook", "default_hooks"]
