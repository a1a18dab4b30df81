"""Secure aggregation, server side: the protocol state machine of a SecAgg round (Bonawitz et al. 2017,
with the optional neighbour graph of SecAgg+, Bell et al. 2020). Math in models/secagg_math.py.

A training round whose params say secure_aggregation = "secagg" runs these stages, each closed by its
own rule or its own deadline (the stage deadline is secagg_stage_s, except masked_input which runs to
the round deadline so devices can train):

    advertise_keys  POST: {c_pk, s_pk, signature}, the signature by the device's registered Ed25519
                    identity key over (session, round, device, keys). Closes when every admission slot
                    advertised, or at its deadline with >= max(min_count, secagg_min_participants).
                    U1 = advertisers (sorted); threshold t and the neighbour graph are fixed here.
                    Admission to the round ends with this stage.
    share_keys      POST: {shares: [{to, ct}], b_commitment}: one AES-GCM ciphertext per neighbour,
                    relayed unread. Closes when all of U1 shared, or at its deadline with >= t. U2.
    masked_input    POST (binary FKSA frame): y_u mod 2^bits. Added to the round's running modular sum
                    on arrival; the sum (not the vector) is written durably (temp, fsync, rename), then
                    the contributor row commits, then the 200. Closes when all of U2 uploaded or the
                    round goal is reached, or at the round deadline with >= max(t, min_count). U3.
    consistency     POST: {signature over U3}. Closes when all of U3 signed, or at its deadline with >= t.
    unmasking       POST: {b_shares: {v: share}, s_shares: {v: share}}: for survivors v the share of b_v,
                    for dropped v (U2 \\ U3) the share of s_sk_v. Closes when every signer answered, or at
                    its deadline with enough shares. Then the server reconstructs, checks every secret
                    (b_v against the device's commitment, s_sk_v against its advertised s_pk), removes
                    the masks, checks that the lifted sum is in range (no mask left: an altered masked
                    vector or share makes the sum uniform garbage), and stores the de-quantized sum.
                    The round then aggregates like any other (server optimizer, DP ledger, new version).

Every GET of a stage long-polls (?wait=seconds) until the stage is closed and then answers what
the device needs next; a failed or abandoned round answers 409 round_closed.

What the server stores for a SecAgg round: the public keys and signatures, the encrypted shares it
relays (it cannot read them), the seed commitments, one running modular sum (never an individual
masked vector: the previous sum file is replaced, not kept), the contributor list (device, payload
SHA-256, example count, training metrics, no content), and after unmasking the shares revealed for
reconstruction and the unmasked sum. Everything but the contributor list and a summary is deleted
when the round closes or is abandoned.

Failure is safe: below threshold at any stage, a secret that does not match its commitment or public
key, or an unmasked sum out of range abandons the round (no model version, nothing released).

Trust and identity: the device's identity key is registered once (POST /v1/devices/identity) and can
never be replaced; devices verify every peer's advertised keys against the peer's identity key and pin
identity keys they have seen (trust on first use), so a server cannot substitute its own keys for a
peer's inside a round, nor swap a known device's identity later. A server that lies in the registry
about a device never seen before is outside this model; it needs an external PKI (e.g. platform key
attestation or a key-transparency log). A MAC under the device's bearer token would not help: peers
cannot verify it, and the server (which stores only hashes of tokens) could not either.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from typing import Any, Callable

import numpy as np

from models import dp
from models import secagg_math as sm
from models.privacy_wire import FrameError
from server.errors import Rejection
from server.secagg_sum import Claim, RunningSum
from server.strategy import _parse_metadata

log = logging.getLogger("server.secagg")

STAGES = ("advertise", "share", "masked", "consistency", "unmask", "finishing", "done")
ACTIVE = ("advertise", "share", "masked", "consistency", "unmask", "finishing")
GET_READY_AFTER = {"advertise_keys": "advertise", "share_keys": "share", "masked_input": "masked",
                   "consistency": "consistency", "unmasking": "unmask"}
MAX_SHARE_CT = 512
MAX_WAIT_S = 25.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_identity (
    device_id     TEXT PRIMARY KEY,
    public_key    TEXT NOT NULL,      -- Ed25519, base64 raw 32 bytes; never replaced
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secagg_rounds (
    round_id       INTEGER PRIMARY KEY,
    session        TEXT NOT NULL,      -- random, binds every key, signature and ciphertext to this round
    stage          TEXT NOT NULL,      -- advertise | share | masked | consistency | unmask | finishing | done | failed
    stage_deadline REAL,
    quantization   TEXT NOT NULL,      -- JSON models.secagg_math.Quantization
    graph_k        INTEGER NOT NULL,
    graph_seed     TEXT,
    threshold      INTEGER,
    u1             TEXT,               -- JSON sorted device ids
    u2             TEXT,
    u3             TEXT,
    sum_file       TEXT,               -- running modular sum of the masked inputs
    sum_count      INTEGER NOT NULL DEFAULT 0,
    result_file    TEXT,               -- the unmasked, de-quantized sum (float64)
    info           TEXT NOT NULL DEFAULT '{}',
    cleaned        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS secagg_keys (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, c_pk TEXT NOT NULL, s_pk TEXT NOT NULL,
    signature TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_shares (
    round_id INTEGER NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL, ct BLOB NOT NULL,
    PRIMARY KEY (round_id, sender, recipient)
);
CREATE INDEX IF NOT EXISTS secagg_shares_to ON secagg_shares(round_id, recipient);
CREATE TABLE IF NOT EXISTS secagg_commitments (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, b_commit TEXT NOT NULL, body_sha TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_consistency (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, signature TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_unmask (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, body TEXT NOT NULL, body_sha TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
"""


def install_schema(db, schema: str = SCHEMA) -> None:
    """CREATE ... IF NOT EXISTS on the writer connection (idempotent; outside any transaction)."""
    with db._lock:
        db._writer.executescript(schema)


class SecAggFailure(Exception):
    """Unmasking cannot produce a trustworthy sum; the round is abandoned with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _secret(value: int, device: str) -> bytes:
    try:
        return sm.int_to_secret(value)
    except sm.SecAggMathError:
        raise SecAggFailure("secagg_bad_share", f"shares of device {device}'s secret do not reconstruct a key "
                                                "(a share was altered)") from None


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class Waiters:
    """Long-poll support: async handlers wait for a round's stage to change; threads notify."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, rid: int) -> None:
        with self._lock:
            waiting = self._waiters.pop(rid, [])
        for loop, ev in waiting:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    async def wait(self, rid: int, ready: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        while True:
            if ready():
                return True
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            ev = asyncio.Event()
            with self._lock:
                self._waiters.setdefault(rid, []).append((loop, ev))
            if ready():
                return True
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass


def neighbourhood_warning(config) -> str | None:
    """A warning when SecAgg+'s neighbourhoods are too small for the configured over-admission.

    Devices admitted beyond the goal arrive after the masked-input stage closed and count as dropouts
    in their neighbours' neighbourhoods, so a neighbour is still there with probability about
    1 / over_admit; a round fails if any survivor keeps fewer than the threshold of its share holders
    (docs/scaling.md measured k = 16 with 30% over-admission: every round abandoned)."""
    k = int(config.secagg_neighbors)
    if config.secure_aggregation != "secagg" or k <= 0 or k + 1 >= config.max_admitted:
        return None  # complete graph (or k covers the cohort): the threshold is over the whole cohort
    keep = 1.0 / float(config.over_admit)

    def chance(kk: int) -> float:
        return sm.unmask_probability(kk, keep, sm.threshold_for(kk + 1, config.secagg_threshold), config.round_goal)

    p = chance(k)
    if p >= 0.9:
        return None
    better = next((kk for kk in range(k + 1, config.max_admitted) if chance(kk) >= 0.99), None)
    advice = (f"use --secagg-neighbors {better} or more" if better else "use the complete graph "
              "(--secagg-neighbors 0)") + " or less over-admission"
    return (f"SecAgg+ with k = {k} neighbours and over-admission {config.over_admit:g}: a round can unmask with "
            f"probability {p:.2g} (each neighbour still there with probability ~{keep:.2f}, threshold "
            f"{sm.threshold_for(k + 1, config.secagg_threshold)} of {k + 1}); {advice}")


class SecAggCoordinator:
    """Server side of the SecAgg protocol for every round that asks for it (one instance per server)."""

    def __init__(self, manager) -> None:
        self.m = manager
        self.db = manager.db
        self.store = manager.store
        self.config = manager.config
        install_schema(self.db)
        warning = neighbourhood_warning(self.config)
        if warning:
            log.warning(warning)
        self._sums: dict[int, RunningSum] = {}
        self._timers: dict[int, dict[str, float]] = {}
        self._finishing: set[int] = set()
        self._graphs: dict[int, tuple[Any, dict[str, list[str]]]] = {}
        # Parts of stage views that no longer change once their stage closed (the cohort's keys, the
        # consistency signatures): built once per round and handed to every device, not re-read per request.
        self._frozen: dict[tuple[str, int], Any] = {}
        self._freeze_lock = threading.Lock()
        self._admitted: set[tuple[int, str]] = set()  # (round, device) pairs seen admitted
        self._rows = self.db.cache()  # secagg_rounds by round id
        self._identities: dict[str, bytes] = {}  # registered identity keys (never replaced)
        self.waiters = Waiters()

    # ------------------------------------------------------------------ rows
    def _row(self, rid: int) -> dict[str, Any] | None:
        """The round's protocol row, parsed (cached; a top-level copy: nested values are shared)."""
        row = self._rows.get(rid, lambda: self._load_row(rid))
        return dict(row) if row is not None else None

    def _load_row(self, rid: int) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM secagg_rounds WHERE round_id = ?", (rid,))
        if row is None:
            return None
        for key in ("u1", "u2", "u3"):
            row[key] = json.loads(row[key]) if row[key] else None
        row["quantization"] = sm.Quantization.from_dict(json.loads(row["quantization"]))
        row["info"] = json.loads(row["info"] or "{}")
        return row

    def _update(self, rid: int, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        vals = tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values())
        self._rows.invalidate(rid)
        self.db._exec(f"UPDATE secagg_rounds SET {cols} WHERE round_id = ?", vals + (rid,))

    def _ensure_row(self, rnd: dict[str, Any]) -> dict[str, Any]:
        rid = rnd["id"]
        row = self._row(rid)
        if row is not None:
            return row
        p = rnd["params"]
        stddev = dp.device_noise_stddev(p["dp_mode"], p["noise_multiplier"], p["clip_norm"], p["min_count"])
        q = sm.choose_quantization(p["clip_norm"], stddev, self.m.dim, p["max_admitted"],
                                   bits=int(p.get("secagg_bits", 32)),
                                   headroom_bits=int(p.get("secagg_headroom_bits", 8)),
                                   sigmas=float(p.get("norm_sigmas", 6.0)))
        now = time.time()
        with self.db.write() as conn:
            self._rows.invalidate(rid)
            conn.execute("INSERT OR IGNORE INTO secagg_rounds(round_id, session, stage, quantization, graph_k, info)"
                         " VALUES (?, ?, 'advertise', ?, ?, ?)",
                         (rid, secrets.token_hex(16), json.dumps(q.to_dict()), int(p.get("secagg_neighbors", 0)),
                          json.dumps({"stages": {"advertise": {"opened": now}}})))
        return self._row(rid)

    def stage(self, rid: int) -> str | None:
        """The round's committed stage (what every view answers from; the row is cached)."""
        row = self._row(rid)
        return row["stage"] if row is not None else None

    def _set_stage(self, rid: int, stage: str, deadline: float | None, **fields: Any) -> None:
        """Inside a write transaction: move to `stage`, recording when the previous one closed."""
        row = self._row(rid)
        info = json.loads(json.dumps(row["info"]))  # the cached row's info is shared
        now = time.time()
        stages = info.setdefault("stages", {})
        stages.setdefault(row["stage"], {})["closed"] = now
        if stage in STAGES:
            stages.setdefault(stage, {})["opened"] = now
        timers = self._timers.get(rid)
        if timers:
            for k, v in timers.items():
                info[k] = info.get(k, 0.0) + v
            timers.clear()
        info.update(fields.pop("info", {}))
        self._update(rid, stage=stage, stage_deadline=deadline, info=info, **fields)

    def _time(self, rid: int, key: str, seconds: float) -> None:
        t = self._timers.setdefault(rid, {})
        t[key] = t.get(key, 0.0) + seconds

    # ------------------------------------------------------------------ task and admission
    def task_params(self, rnd: dict[str, Any]) -> dict[str, Any]:
        row = self._ensure_row(rnd)
        p = rnd["params"]
        rid = rnd["id"]
        base = f"/v1/rounds/{rid}/secagg"
        return {
            "protocol": sm.PROTOCOL, "version": sm.PROTOCOL_VERSION, "round_id": rid, "session": row["session"],
            "bits": row["quantization"].bits, "quantization": row["quantization"].to_dict(),
            "threshold_fraction": float(p.get("secagg_threshold", 2 / 3)), "neighbors": row["graph_k"],
            "min_participants": int(max(p["min_count"], p.get("secagg_min_participants", 3))),
            "stage_timeout_s": float(p.get("secagg_stage_s", 60.0)),
            "urls": {"state": base, "advertise_keys": f"{base}/advertise_keys", "share_keys": f"{base}/share_keys",
                     "masked_input": f"{base}/masked_input", "consistency": f"{base}/consistency",
                     "unmasking": f"{base}/unmasking", "identity": "/v1/devices/identity",
                     "registry": "/v1/devices/{device_id}/identity"},
        }

    def admission_open(self, rnd: dict[str, Any]) -> bool:
        s = self.stage(rnd["id"])
        return s is None or s == "advertise"

    # ------------------------------------------------------------------ identity registry
    def register_identity(self, device_id: str, public_key_b64: str) -> dict[str, Any]:
        try:
            key = sm.unb64(public_key_b64, 32)
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"public_key: {exc}", status=422) from None
        canonical = sm.b64(key)
        with self.m.lock:
            row = self.db.one("SELECT public_key, registered_at FROM device_identity WHERE device_id = ?", (device_id,))
            if row is not None:
                if row["public_key"] != canonical:
                    raise Rejection("identity_exists", "this device already registered a different identity key")
                return {"device_id": device_id, "public_key": canonical, "registered_at": row["registered_at"],
                        "created": False}
            now = time.time()
            with self.db.write() as conn:
                conn.execute("INSERT INTO device_identity(device_id, public_key, registered_at) VALUES (?, ?, ?)",
                             (device_id, canonical, now))
        return {"device_id": device_id, "public_key": canonical, "registered_at": now, "created": True}

    def identity(self, device_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT device_id, public_key, registered_at FROM device_identity WHERE device_id = ?",
                          (device_id,))
        if row is None:
            raise Rejection("unknown_identity", f"device {device_id} has no registered identity key")
        return row

    def _identity_key(self, device_id: str) -> bytes:
        key = self._identities.get(device_id)
        if key is None:
            row = self.db.one("SELECT public_key FROM device_identity WHERE device_id = ?", (device_id,))
            if row is None:
                raise Rejection("no_identity", "register an identity key first (POST /v1/devices/identity)")
            key = self._identities[device_id] = sm.unb64(row["public_key"], 32)
        return key

    # ------------------------------------------------------------------ common checks
    def _round(self, rid: int, device_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        rnd = self.db.get_round(rid)
        if rnd is None or rnd["kind"] != "train" or rnd["params"].get("secure_aggregation", "none") != "secagg":
            raise Rejection("unknown_round", f"no secure-aggregation round {rid}")
        if device_id is not None and (rid, device_id) not in self._admitted:
            if not self.db.is_admitted(rid, device_id):
                raise Rejection("not_admitted", f"device was not admitted to round {rid}")
            self._admitted.add((rid, device_id))  # an admission is never withdrawn
        row = self._row(rid)
        if row is None:
            row = self._ensure_row(rnd)
        return rnd, row

    def _require_stage(self, rnd: dict[str, Any], row: dict[str, Any], stage: str) -> None:
        if rnd["state"] != "open" or row["stage"] == "failed":
            raise Rejection("round_closed", f"round {rnd['id']} is {rnd['state']}"
                            + (f" ({row['info'].get('failure')})" if row["info"].get("failure") else ""))
        if row["stage"] != stage:
            raise Rejection("round_closed", f"round {rnd['id']} is in secure-aggregation stage {row['stage']!r}, "
                                            f"not {stage!r}")

    # ------------------------------------------------------------------ stage 1: advertise keys
    def advertise(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        try:
            c_pk = sm.unb64(str(body.get("c_pk", "")), 32)
            s_pk = sm.unb64(str(body.get("s_pk", "")), 32)
            sig = sm.unb64(str(body.get("signature", "")), 64)
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"advertise_keys: {exc}", status=422) from None
        if c_pk == s_pk:
            raise Rejection("bad_request", "c_pk and s_pk must differ", status=422)
        identity = self._identity_key(device_id)
        if not sm.verify(identity, sig, sm.advertise_message(row["session"], rid, device_id, c_pk, s_pk)):
            raise Rejection("bad_signature", "advertised keys are not signed by this device's identity key")
        with self.m.lock:
            rnd, row = self._round(rid, device_id)
            prev = self.db.one("SELECT c_pk, s_pk FROM secagg_keys WHERE round_id = ? AND device_id = ?",
                               (rid, device_id))
            if prev is not None:
                if (prev["c_pk"], prev["s_pk"]) != (sm.b64(c_pk), sm.b64(s_pk)):
                    raise Rejection("duplicate_upload", "this device already advertised other keys for this round")
                return {"status": "accepted", "round_id": rid, "stage": row["stage"]}
            self._require_stage(rnd, row, "advertise")
            with self.db.write() as conn:
                conn.execute("INSERT INTO secagg_keys(round_id, device_id, c_pk, s_pk, signature, at)"
                             " VALUES (?, ?, ?, ?, ?, ?)", (rid, device_id, sm.b64(c_pk), sm.b64(s_pk), sm.b64(sig),
                                                            time.time()))
            n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_keys WHERE round_id = ?", (rid,)))
            if n >= rnd["params"]["max_admitted"]:
                self._close_advertise(rnd, row)
            return {"status": "accepted", "round_id": rid, "stage": self.stage(rid)}

    def _min_participants(self, rnd: dict[str, Any]) -> int:
        p = rnd["params"]
        return int(max(p["min_count"], p.get("secagg_min_participants", 3), 2))

    def _close_advertise(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        rid = rnd["id"]
        u1 = sorted(r["device_id"] for r in self.db.all("SELECT device_id FROM secagg_keys WHERE round_id = ?", (rid,)))
        if len(u1) < self._min_participants(rnd):
            self._fail(rnd, f"secagg_too_few_keys: {len(u1)} devices advertised keys, "
                            f"{self._min_participants(rnd)} needed")
            return
        seed = secrets.token_hex(16)
        graph = sm.neighbours(u1, row["graph_k"], seed)
        holders = min(len(v) for v in graph.values()) + 1
        t = sm.threshold_for(holders, float(rnd["params"].get("secagg_threshold", 2 / 3)))
        with self.db.write():
            self._set_stage(rid, "share", time.time() + self._stage_s(rnd), u1=u1, graph_seed=seed, threshold=t,
                            info={"n_u1": len(u1), "threshold": t, "holders_per_secret": holders})
        log.info("round %d secagg: %d devices advertised keys; threshold %d of %d holders", rid, len(u1), t, holders)
        self._keys_part(rid)  # built here, once, so the cohort's views only read memory
        self.waiters.notify(rid)

    def _graph(self, rid: int, row: dict[str, Any]) -> dict[str, list[str]]:
        """The round's neighbour graph (computed once per round: O(n^2) for the complete graph)."""
        key = (rid, row["graph_seed"])
        if self._graphs.get(rid, (None,))[0] != key:
            self._graphs[rid] = (key, sm.neighbours(row["u1"], row["graph_k"], row["graph_seed"]))
        return self._graphs[rid][1]

    def _stage_s(self, rnd: dict[str, Any]) -> float:
        return float(rnd["params"].get("secagg_stage_s", 60.0))

    def keys_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        self._raise_if_failed(rnd, row)
        if STAGES.index(row["stage"]) <= STAGES.index("advertise"):
            return {"ready": False, "stage": row["stage"]}
        participants = self._keys_part(rid)
        return {"ready": True, "stage": row["stage"], "session": row["session"], "threshold": row["threshold"],
                "neighbors": row["graph_k"], "graph_seed": row["graph_seed"], "participants": participants}

    def _keys_part(self, rid: int) -> list[dict[str, Any]]:
        """U1's advertised keys with their identity keys (fixed from the close of the advertise stage on)."""
        def build() -> list[dict[str, Any]]:
            keys = {r["device_id"]: r for r in self.db.all("SELECT * FROM secagg_keys WHERE round_id = ?", (rid,))}
            idents = {r["device_id"]: r["public_key"] for r in self.db.all(
                "SELECT device_id, public_key FROM device_identity WHERE device_id IN (SELECT device_id FROM"
                " secagg_keys WHERE round_id = ?)", (rid,))}
            return [{"device_id": u, "index": i + 1, "c_pk": keys[u]["c_pk"], "s_pk": keys[u]["s_pk"],
                     "signature": keys[u]["signature"], "identity_key": idents.get(u)}
                    for i, u in enumerate(self._row(rid)["u1"])]
        return self._frozen_part("keys", rid, build)

    def _inbox_part(self, rid: int) -> dict[str, list[dict[str, str]]]:
        """U2's encrypted shares by recipient (fixed from the close of the share stage on)."""
        def build() -> dict[str, list[dict[str, str]]]:
            u2, inbox = set(self._row(rid)["u2"]), {}
            for r in self.db.all("SELECT sender, recipient, ct FROM secagg_shares WHERE round_id = ? ORDER BY sender",
                                 (rid,)):
                if r["sender"] in u2:
                    inbox.setdefault(r["recipient"], []).append({"from": r["sender"], "ct": sm.b64(bytes(r["ct"]))})
            return inbox
        return self._frozen_part("shares", rid, build)

    def _signatures_part(self, rid: int) -> list[dict[str, str]]:
        """The consistency signatures (fixed from the close of the consistency stage on)."""
        return self._frozen_part("signatures", rid, lambda: [
            {"device_id": r["device_id"], "signature": r["signature"]} for r in self.db.all(
                "SELECT device_id, signature FROM secagg_consistency WHERE round_id = ? ORDER BY device_id", (rid,))])

    def _frozen_part(self, kind: str, rid: int, build: Callable[[], Any]) -> Any:
        """A part of a stage view that no longer changes once its stage closed, built once per round
        (by one thread: the cohort asks for it all at once) and handed to every device."""
        value = self._frozen.get((kind, rid))
        if value is None:
            with self._freeze_lock:
                value = self._frozen.get((kind, rid))
                if value is None:
                    value = self._frozen[(kind, rid)] = build()
        return value

    def _raise_if_failed(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        if row["stage"] == "failed" or rnd["state"] == "abandoned":
            reason = row["info"].get("failure") or (rnd.get("outcome") or {}).get("reason") or "abandoned"
            raise Rejection("round_closed", f"round {rnd['id']} failed: {reason}")

    # ------------------------------------------------------------------ stage 2: share keys
    def share(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        body_sha = _sha(json.dumps(body, sort_keys=True))
        prev = self.db.one("SELECT body_sha FROM secagg_commitments WHERE round_id = ? AND device_id = ?",
                           (rid, device_id))
        if prev is not None:
            if prev["body_sha"] != body_sha:
                raise Rejection("duplicate_upload", "this device already shared other keys in this round")
            return {"status": "accepted", "round_id": rid, "stage": row["stage"]}
        self._require_stage(rnd, row, "share")
        if device_id not in row["u1"]:
            raise Rejection("not_admitted", "device did not advertise keys in time for this round")
        graph = self._graph(rid, row)
        want = set(graph[device_id])
        shares = body.get("shares")
        commit = body.get("b_commitment")
        if not isinstance(shares, list) or not isinstance(commit, str) or len(commit) != 64:
            raise Rejection("bad_request", "share_keys needs {shares: [{to, ct}], b_commitment: sha256 hex}", status=422)
        rows = []
        seen = set()
        for s in shares:
            to, ct = (s.get("to"), s.get("ct")) if isinstance(s, dict) else (None, None)
            if not isinstance(to, str) or to not in want or to in seen or not isinstance(ct, str):
                raise Rejection("bad_request", f"share addressed to {to!r}: not a neighbour, or repeated", status=422)
            try:
                blob = sm.unb64(ct)
            except sm.SecAggMathError as exc:
                raise Rejection("bad_request", f"share to {to}: {exc}", status=422) from None
            if len(blob) > MAX_SHARE_CT:
                raise Rejection("bad_request", f"share to {to} is too large", status=422)
            seen.add(to)
            rows.append((rid, device_id, to, blob))
        if seen != want:
            raise Rejection("bad_request", f"shares must go to every neighbour ({len(want)}), got {len(seen)}",
                            status=422)
        with self.m.lock:
            rnd, row = self._round(rid, device_id)
            if self.db.one("SELECT 1 AS x FROM secagg_commitments WHERE round_id = ? AND device_id = ?",
                           (rid, device_id)) is not None:
                return self.share(device_id, rid, body)
            self._require_stage(rnd, row, "share")
            with self.db.write() as conn:
                conn.executemany("INSERT INTO secagg_shares(round_id, sender, recipient, ct) VALUES (?, ?, ?, ?)", rows)
                conn.execute("INSERT INTO secagg_commitments(round_id, device_id, b_commit, body_sha, at)"
                             " VALUES (?, ?, ?, ?, ?)", (rid, device_id, commit, body_sha, time.time()))
            n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_commitments WHERE round_id = ?", (rid,)))
            if n >= len(row["u1"]):
                self._close_share(rnd, row)
            return {"status": "accepted", "round_id": rid, "stage": self.stage(rid)}

    def _close_share(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        rid = rnd["id"]
        u2 = sorted(r["device_id"] for r in self.db.all("SELECT device_id FROM secagg_commitments WHERE round_id = ?",
                                                         (rid,)))
        need = max(row["threshold"], self._min_participants(rnd))
        if len(u2) < need:
            self._fail(rnd, f"secagg_below_threshold: {len(u2)} devices shared keys, {need} needed")
            return
        deadline = max(rnd["deadline"] or 0.0, time.time() + self._stage_s(rnd))
        with self.db.write():
            self._set_stage(rid, "masked", deadline, u2=u2, info={"n_u2": len(u2)})
        log.info("round %d secagg: %d devices shared keys", rid, len(u2))
        self._inbox_part(rid)
        self.waiters.notify(rid)

    def shares_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        self._raise_if_failed(rnd, row)
        if STAGES.index(row["stage"]) <= STAGES.index("share"):
            return {"ready": False, "stage": row["stage"]}
        shares = self._inbox_part(rid).get(device_id, [])
        return {"ready": True, "stage": row["stage"], "u2": row["u2"], "shares": shares}

    # ------------------------------------------------------------------ stage 3: masked input
    def max_input_bytes(self) -> int:
        return self.m.dim * 8 + (1 << 16)

    def masked_input(self, device_id: str, rid: int, body: bytes) -> dict[str, Any]:
        """Stage and commit one masked input (the HTTP route runs the two halves separately so that the
        request body is freed as soon as it has been added to the staging sum)."""
        return self.commit_masked(self.stage_masked(device_id, rid, body))

    def stage_masked(self, device_id: str, rid: int, body: bytes) -> tuple[RunningSum, Claim] | dict[str, Any]:
        """Validate a masked input and add it to the round's staging sum. Returns (the round's running
        sum, the input's claim), or the stored answer when the input was already committed (a retry)."""
        rnd, row = self._round(rid, device_id)
        prev = self.db.get_update(rid, device_id)
        if prev is not None:
            if prev["payload_sha256"] != hashlib.sha256(memoryview(body)[:-32]).hexdigest():
                raise Rejection("duplicate_upload", f"round {rid} already holds a different masked input from this device")
            return self._answer(prev)
        self._require_stage(rnd, row, "masked")
        if device_id not in row["u2"]:
            raise Rejection("not_admitted", "device did not share keys in this round")
        q = row["quantization"]
        try:
            header, y, sha = sm.decode_masked(body, bits=q.bits, dim=self.m.dim, max_bytes=self.max_input_bytes())
        except FrameError as exc:
            raise Rejection(exc.reason, exc.detail) from None
        if header.get("round_id") != rid or header.get("session") != row["session"] \
                or header.get("device_id") != device_id:
            raise Rejection("bad_metadata", "masked input is for another round, session or device")
        meta = header.get("metadata") or {}
        num_examples, metrics = _parse_metadata(meta, rnd["params"]["max_examples_per_update"])
        running = self._running(rid)
        return running, running.stage(Claim(device_id, sha, num_examples, metrics), y)

    def commit_masked(self, staged: tuple[RunningSum, Claim] | dict[str, Any]) -> dict[str, Any]:
        """The staged input's answer once it is in the durable running sum (group commit: inputs
        staged while a sum is being written go together in the next write)."""
        if isinstance(staged, dict):
            return staged
        running, claim = staged
        rid = running.round_id
        answer = running.wait(claim, lambda claims, new, count: self._commit_sum(rid, claims, new, count))
        self.m.metrics.inc("fk_uploads_total", {"result": "accepted"})
        return answer

    def _running(self, rid: int) -> RunningSum:
        """The round's running sum (loaded from its file after a restart)."""
        running = self._sums.get(rid)
        if running is None:
            with self.m.lock:
                running = self._sums.get(rid)
                if running is None:
                    row = self._row(rid)
                    q = row["quantization"]
                    current = None
                    if row["sum_file"]:
                        current = np.load(self.store.path(row["sum_file"]), allow_pickle=False)
                        if current.dtype != sm.ring_dtype(q.bits) or current.size != self.m.dim:
                            raise RuntimeError(f"round {rid}: stored running sum has the wrong layout")
                    running = self._sums[rid] = RunningSum(rid, self.m.dim, sm.ring_dtype(q.bits), current,
                                                           int(row["sum_count"]))
        return running

    def _commit_sum(self, rid: int, claims: list[Claim], new: np.ndarray, count: int) -> Callable[[], None]:
        """Make `new` (the running sum with `claims` added) durable: sum file first, then one transaction
        with every contributor row and the row's pointer to the file. Returns what follows once it is
        the current sum: the old file goes, the claims get their answers, the stage may close."""
        tb = time.perf_counter()
        rnd, row = self._round(rid, None)
        self._require_stage(rnd, row, "masked")
        rel = f"secagg/r{rid:06d}/sum-{count:06d}-{secrets.token_hex(4)}.npy"
        self.store.write_atomic(rel, lambda f: np.save(f, new, allow_pickle=False),
                                size=new.nbytes + 128)  # durable first
        try:
            with self.m.lock:
                rnd, row = self._round(rid, None)
                self._require_stage(rnd, row, "masked")
                if row["sum_count"] != count - len(claims):
                    raise RuntimeError("running sum out of step with the database")
                now = time.time()
                q = row["quantization"]
                with self.db.write():
                    for c in claims:
                        self.db.add_update(round_id=rid, device_id=c.device_id, payload_sha256=c.sha, file=None,
                                           num_examples=c.num_examples, weight=1.0, norm=0.0,
                                           dtype=f"secagg{q.bits}", metrics=c.metrics, received_at=now)
                        self.db.touch_device(c.device_id, now)
                    self._update(rid, sum_file=rel, sum_count=count)
        except BaseException:
            self.store.delete(rel)
            raise
        self._time(rid, "ingest_seconds", time.perf_counter() - tb)  # write + commit
        self._time(rid, "ingest_batches", 1.0)

        def after() -> None:  # the row points at the new sum: from here on it stays
            for c in claims:
                c.finish(answer=self._answer({"round_id": rid, "payload_sha256": c.sha,
                                              "num_examples": c.num_examples}))
            self.store.delete(row["sum_file"])
            if count >= len(row["u2"]) or count >= rnd["params"]["goal"]:
                with self.m.lock:
                    now_rnd, now_row = self._round(rid, None)
                    if now_row["stage"] == "masked" and now_rnd["state"] == "open":
                        self._close_masked(now_rnd, now_row)
        return after

    @staticmethod
    def _answer(row: dict[str, Any]) -> dict[str, Any]:
        return {"status": "accepted", "round_id": row["round_id"], "payload_sha256": row["payload_sha256"],
                "num_examples": row["num_examples"]}

    def _close_masked(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        rid = rnd["id"]
        u3 = sorted(r["device_id"] for r in self.db.list_updates(rid))
        need = max(row["threshold"], self._min_participants(rnd))
        if len(u3) < need:
            self._fail(rnd, f"secagg_below_threshold: {len(u3)} masked inputs, {need} needed")
            return
        with self.db.write():
            self._set_stage(rid, "consistency", time.time() + self._stage_s(rnd), u3=u3,
                            info={"n_u3": len(u3), "dropped_after_sharing": len(row["u2"]) - len(u3)})
        log.info("round %d secagg: %d masked inputs (%d of U2 dropped)", rid, len(u3), len(row["u2"]) - len(u3))
        self.waiters.notify(rid)

    def survivors_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        self._raise_if_failed(rnd, row)
        if STAGES.index(row["stage"]) <= STAGES.index("masked"):
            return {"ready": False, "stage": row["stage"]}
        return {"ready": True, "stage": row["stage"], "u3": row["u3"]}

    # ------------------------------------------------------------------ stage 4: consistency check
    def consistency(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        try:
            sig = sm.unb64(str(body.get("signature", "")), 64)
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"consistency: {exc}", status=422) from None
        with self.m.lock:
            rnd, row = self._round(rid, device_id)
            prev = self.db.one("SELECT signature FROM secagg_consistency WHERE round_id = ? AND device_id = ?",
                               (rid, device_id))
            if prev is not None:
                if prev["signature"] != sm.b64(sig):
                    raise Rejection("duplicate_upload", "this device already signed")
                return {"status": "accepted", "round_id": rid, "stage": row["stage"]}
            self._require_stage(rnd, row, "consistency")
            if device_id not in row["u3"]:
                raise Rejection("not_admitted", "device is not among this round's masked inputs")
            if not sm.verify(self._identity_key(device_id), sig, sm.consistency_message(row["session"], rid, row["u3"])):
                raise Rejection("bad_signature", "consistency signature does not verify over this round's U3")
            with self.db.write() as conn:
                conn.execute("INSERT INTO secagg_consistency(round_id, device_id, signature, at) VALUES (?, ?, ?, ?)",
                             (rid, device_id, sm.b64(sig), time.time()))
            n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_consistency WHERE round_id = ?", (rid,)))
            if n >= len(row["u3"]):
                self._close_consistency(rnd, row)
            return {"status": "accepted", "round_id": rid, "stage": self.stage(rid)}

    def _close_consistency(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        rid = rnd["id"]
        n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_consistency WHERE round_id = ?", (rid,)))
        if n < row["threshold"]:
            self._fail(rnd, f"secagg_below_threshold: {n} consistency signatures, {row['threshold']} needed")
            return
        with self.db.write():
            self._set_stage(rid, "unmask", time.time() + self._stage_s(rnd), info={"n_signed": n})
        self._signatures_part(rid)
        self.waiters.notify(rid)

    def signatures_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        self._raise_if_failed(rnd, row)
        if STAGES.index(row["stage"]) <= STAGES.index("consistency"):
            return {"ready": False, "stage": row["stage"]}
        sigs = self._signatures_part(rid)
        return {"ready": True, "stage": row["stage"], "u3": row["u3"], "signatures": sigs}

    # ------------------------------------------------------------------ stage 5: unmasking
    def unmasking(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        body_sha = _sha(json.dumps(body, sort_keys=True))
        prev = self.db.one("SELECT body_sha FROM secagg_unmask WHERE round_id = ? AND device_id = ?", (rid, device_id))
        if prev is not None:
            if prev["body_sha"] != body_sha:
                raise Rejection("duplicate_upload", "this device already sent its unmasking shares")
            return {"status": "accepted", "round_id": rid, "stage": row["stage"]}
        self._require_stage(rnd, row, "unmask")
        if device_id not in row["u3"]:
            raise Rejection("not_admitted", "device is not among this round's masked inputs")
        graph = self._graph(rid, row)
        u3, dropped = set(row["u3"]), set(row["u2"]) - set(row["u3"])
        want_b = {v for v in u3 if v == device_id or device_id in graph[v]}
        want_s = {v for v in dropped if device_id in graph[v]}
        b_sh, s_sh = body.get("b_shares"), body.get("s_shares")
        if not isinstance(b_sh, dict) or not isinstance(s_sh, dict) or set(b_sh) != want_b or set(s_sh) != want_s:
            raise Rejection("bad_request", f"unmasking needs b_shares for {sorted(want_b)} and s_shares for "
                                           f"{sorted(want_s)}", status=422)
        try:
            for share in list(b_sh.values()) + list(s_sh.values()):
                sm.share_from_bytes(sm.unb64(str(share), sm.SHARE_BYTES))
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"unmasking share: {exc}", status=422) from None
        with self.m.lock:
            rnd, row = self._round(rid, device_id)
            if self.db.one("SELECT 1 AS x FROM secagg_unmask WHERE round_id = ? AND device_id = ?",
                           (rid, device_id)) is not None:
                return self.unmasking(device_id, rid, body)
            self._require_stage(rnd, row, "unmask")
            with self.db.write() as conn:
                conn.execute("INSERT INTO secagg_unmask(round_id, device_id, body, body_sha, at) VALUES (?, ?, ?, ?, ?)",
                             (rid, device_id, json.dumps({"b": b_sh, "s": s_sh}), body_sha, time.time()))
            n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_unmask WHERE round_id = ?", (rid,)))
            signed = int(self.db.scalar("SELECT COUNT(*) FROM secagg_consistency WHERE round_id = ?", (rid,)))
            if n >= signed:
                self._close_unmask(rnd, row)
            return {"status": "accepted", "round_id": rid, "stage": self.stage(rid)}

    def _close_unmask(self, rnd: dict[str, Any], row: dict[str, Any]) -> None:
        rid = rnd["id"]
        n = int(self.db.scalar("SELECT COUNT(*) FROM secagg_unmask WHERE round_id = ?", (rid,)))
        if n < row["threshold"]:
            self._fail(rnd, f"secagg_below_threshold: {n} devices sent unmasking shares, {row['threshold']} needed")
            return
        with self.db.write():
            self._set_stage(rid, "finishing", None, info={"n_unmask": n})
        self.waiters.notify(rid)
        self._start_finish(rid)

    def _start_finish(self, rid: int) -> None:
        if rid in self._finishing:
            return
        self._finishing.add(rid)
        threading.Thread(target=self._finish, args=(rid,), name=f"secagg-finish-{rid}", daemon=True).start()

    def result_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, row = self._round(rid, device_id)
        self._raise_if_failed(rnd, row)
        ready = row["stage"] == "done"
        return {"ready": ready, "stage": row["stage"], "round_state": rnd["state"],
                "result_version": rnd["result_version"]}

    # ------------------------------------------------------------------ reconstruction and unmasking
    def _finish(self, rid: int) -> None:
        try:
            self._finish_inner(rid)
        except Exception as exc:  # noqa: BLE001 - any failure abandons the round safely
            if not isinstance(exc, SecAggFailure):
                log.exception("round %d secagg: unmasking failed", rid)
            reason = str(exc) if isinstance(exc, SecAggFailure) else f"secagg_unmask_failed: {exc}"
            with self.m.lock:
                rnd = self.db.get_round(rid)
                if rnd is not None and rnd["state"] == "open":
                    self._fail(rnd, reason)
        finally:
            self._finishing.discard(rid)

    def _finish_inner(self, rid: int) -> None:
        t0 = time.perf_counter()
        rnd = self.db.get_round(rid)
        row = self._row(rid)
        if rnd is None or row is None or row["stage"] != "finishing" or rnd["state"] != "open":
            return
        q: sm.Quantization = row["quantization"]
        ctx = sm.round_context(row["session"], rid)
        u1, u2, u3 = row["u1"], row["u2"], row["u3"]
        index = {u: i + 1 for i, u in enumerate(u1)}
        t = row["threshold"]
        keys = {r["device_id"]: r for r in self.db.all("SELECT device_id, s_pk FROM secagg_keys WHERE round_id = ?",
                                                        (rid,))}
        s_pks = {u: sm.unb64(keys[u]["s_pk"], 32) for u in u1}
        commits = {r["device_id"]: r["b_commit"] for r in self.db.all(
            "SELECT device_id, b_commit FROM secagg_commitments WHERE round_id = ?", (rid,))}
        b_points: dict[str, dict[int, int]] = {v: {} for v in u3}
        s_points: dict[str, dict[int, int]] = {v: {} for v in set(u2) - set(u3)}
        for r in self.db.all("SELECT device_id, body FROM secagg_unmask WHERE round_id = ?", (rid,)):
            body = json.loads(r["body"])
            x = index[r["device_id"]]
            for v, share in body["b"].items():
                b_points[v][x] = sm.share_from_bytes(sm.unb64(share))
            for v, share in body["s"].items():
                s_points[v][x] = sm.share_from_bytes(sm.unb64(share))
        self_seeds: dict[str, bytes] = {}
        for v, pts in b_points.items():
            if len(pts) < t:
                raise SecAggFailure("secagg_below_threshold", f"only {len(pts)} shares of device {v}'s self-mask "
                                                              f"seed, {t} needed")
            seed = _secret(sm.shamir_reconstruct(pts, t), v)
            if not secrets.compare_digest(sm.commitment(row["session"], rid, v, seed), commits[v]):
                raise SecAggFailure("secagg_bad_share", f"self-mask seed of device {v} does not match its "
                                                        "commitment (a share was altered)")
            self_seeds[v] = seed
        dropped_sks: dict[str, bytes] = {}
        for v, pts in s_points.items():
            if len(pts) < t:
                raise SecAggFailure("secagg_below_threshold", f"only {len(pts)} shares of dropped device {v}'s "
                                                              f"mask key, {t} needed")
            sk = _secret(sm.shamir_reconstruct(pts, t), v)
            if sm.x25519_public(sk) != s_pks[v]:
                raise SecAggFailure("secagg_bad_share", f"mask key of dropped device {v} does not match its "
                                                        "public key (a share was altered)")
            dropped_sks[v] = sk
        t_rec = time.perf_counter()
        current = self._running(rid).current
        if current is None:
            raise ValueError("no running sum")
        total = np.array(current, copy=True)
        graph = self._graph(rid, row)
        sm.unmask(total, q.bits, u3, self_seeds, dropped_sks, s_pks, graph, ctx, sm.PRG(self.m.dim, q.bits))
        lifted = sm.lift(total, q.bits)
        ok, peak = sm.check_range(lifted, len(u3), q)
        t_unmask = time.perf_counter()
        if not ok:
            raise SecAggFailure("secagg_integrity", f"unmasked sum has a coordinate of {peak}, beyond the "
                                f"{len(u3)} x {q.qmax} any honest sum can reach (a masked vector was altered)")
        sum_sha = hashlib.sha256(memoryview(np.ascontiguousarray(lifted, dtype="<i8"))).hexdigest()  # no copy
        total_f = sm.dequantize(lifted, q)
        norm = float(np.linalg.norm(total_f))
        p = rnd["params"]
        stddev = dp.device_noise_stddev(p["dp_mode"], p["noise_multiplier"], p["clip_norm"], p["min_count"])
        bound = len(u3) * dp.norm_tolerance(p["clip_norm"], stddev, self.m.dim, p["norm_sigmas"]) \
            + math.sqrt(self.m.dim) * len(u3) / q.scale
        if norm > bound:
            raise SecAggFailure("secagg_integrity", f"unmasked sum norm {norm:.4g} exceeds {bound:.4g}")
        rel = f"secagg/r{rid:06d}/result-{secrets.token_hex(4)}.npy"
        self.store.write_atomic(rel, lambda f: np.save(f, total_f, allow_pickle=False))
        with self.m.lock:
            rnd = self.db.get_round(rid)
            if rnd["state"] != "open" or self.stage(rid) != "finishing":
                self.store.delete(rel)
                return
            with self.db.write():
                self._set_stage(rid, "done", None, result_file=rel, info={
                    "sum_sha256": sum_sha, "sum_norm": norm, "max_abs_int": peak,
                    "reconstruct_seconds": t_rec - t0, "unmask_seconds": t_unmask - t_rec,
                    "finish_seconds": time.perf_counter() - t0, "dropped_recovered": sorted(dropped_sks)})
                self.db.update_round(rid, state="aggregating")
        log.info("round %d secagg: unmasked the sum of %d inputs (%d dropped devices' masks removed) in %.2fs",
                 rid, len(u3), len(dropped_sks), time.perf_counter() - t0)
        self.waiters.notify(rid)
        self.m._wake.set()

    def result_sum(self, rid: int) -> np.ndarray:
        row = self._row(rid)
        if row is None or not row["result_file"]:
            raise RuntimeError(f"round {rid} has no unmasked sum")
        return np.load(self.store.path(row["result_file"]), allow_pickle=False)

    # ------------------------------------------------------------------ failure, deadlines, cleanup
    def _fail(self, rnd: dict[str, Any], reason: str) -> None:
        """Abandon the round (caller holds the manager lock)."""
        rid = rnd["id"]
        log.warning("round %d secagg failed: %s", rid, reason)
        with self.db.write():
            if self._row(rid) is not None:
                self._set_stage(rid, "failed", None, info={"failure": reason})
            doomed = self.m._abandon_rows(rnd, reason.split(":")[0])
        self.m._delete_round_files(doomed)
        self.waiters.notify(rid)
        self._cleanup(rid)

    def tick(self, now: float) -> None:
        rows = self.db.all("SELECT round_id, stage, stage_deadline FROM secagg_rounds WHERE cleaned = 0")
        for r in rows:
            rid, stage = r["round_id"], r["stage"]
            rnd = self.db.get_round(rid)
            if rnd is None:
                continue
            if rnd["state"] in ("closed", "abandoned"):
                if stage in ACTIVE:
                    with self.m.lock, self.db.write():
                        self._set_stage(rid, "failed", None, info={"failure": f"round {rnd['state']}"})
                    self.waiters.notify(rid)
                self._cleanup(rid)
                continue
            if stage == "finishing" and rid not in self._finishing:
                self._start_finish(rid)  # after a restart
                continue
            deadline = r["stage_deadline"]
            if stage == "advertise" and deadline is None and rnd["deadline"] is not None:
                # The advertise stage runs secagg_stage_s from the round's first admission.
                first_admission = rnd["deadline"] - rnd["params"]["deadline_s"]
                with self.m.lock, self.db.write():
                    self._update(rid, stage_deadline=first_admission + self._stage_s(rnd))
                continue
            if deadline is None or now < deadline or stage not in ACTIVE:
                continue
            with self.m.lock:
                rnd, row = self.db.get_round(rid), self._row(rid)
                if rnd["state"] != "open" or row["stage"] != stage:
                    continue
                log.info("round %d secagg: stage %s reached its deadline", rid, stage)
                {"advertise": self._close_advertise, "share": self._close_share, "masked": self._close_masked,
                 "consistency": self._close_consistency, "unmask": self._close_unmask}[stage](rnd, row)

    def _cleanup(self, rid: int) -> None:
        """Drop everything but the summary once a round is over (keys, shares, sums)."""
        row = self._row(rid)
        if row is None or row["cleaned"]:
            return
        rnd = self.db.get_round(rid)
        if rnd is not None and rnd["state"] in ("open", "aggregating"):
            return
        with self.m.lock:
            with self.db.write() as conn:
                for table in ("secagg_shares", "secagg_unmask", "secagg_consistency", "secagg_commitments",
                              "secagg_keys"):
                    conn.execute(f"DELETE FROM {table} WHERE round_id = ?", (rid,))
                self._update(rid, cleaned=1, sum_file=None, result_file=None)
            self._sums.pop(rid, None)
            self._graphs.pop(rid, None)
            for kind in ("keys", "shares", "signatures"):
                self._frozen.pop((kind, rid), None)
            self._admitted = {pair for pair in self._admitted if pair[0] != rid}
            self._timers.pop(rid, None)
        for rel in (row["sum_file"], row["result_file"]):
            self.store.delete(rel)
        d = self.store.path(f"secagg/r{rid:06d}")
        if d.is_dir():
            for p in d.iterdir():
                p.unlink(missing_ok=True)
            d.rmdir()

    def recover(self) -> None:
        """At start: delete sum/result files no row references (left by a crash mid-write)."""
        root = self.store.path("secagg")
        if not root.is_dir():
            return
        live = set()
        for r in self.db.all("SELECT sum_file, result_file FROM secagg_rounds WHERE cleaned = 0"):
            live.update(x for x in (r["sum_file"], r["result_file"]) if x)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.store.root).as_posix()
                if rel not in live:
                    p.unlink(missing_ok=True)
        for d in sorted(root.iterdir()):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    def summary(self, rid: int) -> dict[str, Any] | None:
        row = self._row(rid)
        if row is None:
            return None
        info = dict(row["info"])
        return {"protocol": sm.PROTOCOL, "stage": row["stage"], "threshold": row["threshold"],
                "neighbors": row["graph_k"], "bits": row["quantization"].bits,
                "scale": row["quantization"].scale, "n_u1": len(row["u1"] or []), "n_u2": len(row["u2"] or []),
                "n_u3": len(row["u3"] or []), **info}


__all__ = ["SecAggCoordinator", "SecAggFailure", "Waiters", "install_schema", "neighbourhood_warning", "STAGES",
           "GET_READY_AFTER"]
