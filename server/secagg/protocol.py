"""The SecAgg protocol, server side, as pure functions: no database, no files, no clock, no threads.

The round's protocol state (`SecAggState`, one row of secagg_rounds) moves through the stages

    advertise -> share -> masked -> consistency -> unmask -> finishing -> done      (or failed)

Each `close_*` function decides, from the state and what the stage collected, whether the round
advances (an `Advance`: the next stage, its deadline and the columns to set) or fails (a `Fail`: the
round is abandoned, nothing released). `recover_sum` reconstructs the secrets from the unmasking
shares, checks each against its commitment or public key, removes the masks and checks the range and
norm of the result. Between deadlines, `decide_early` judges a stage's `Tally` (who may still answer,
knowing the devices that reported leaving): fail at once when the threshold is out of reach, close at
once when nobody else can answer. Message checks (`parse_*`) turn a device's JSON into validated values
or raise Rejection. The service (server/secagg/service.py) does the I/O around these. Math: models/secagg_math.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from typing import Any, Callable, Mapping

import numpy as np

from models import secagg_math as sm
from server.errors import Rejection
from server.round import Round, TrainParams
from server.strategy import UploadBound

STAGES = ("advertise", "share", "masked", "consistency", "unmask", "finishing", "done")
ACTIVE = ("advertise", "share", "masked", "consistency", "unmask", "finishing")
GET_READY_AFTER = {"advertise_keys": "advertise", "share_keys": "share", "masked_input": "masked",
                   "consistency": "consistency", "unmasking": "unmask"}
MAX_SHARE_CT = 512
SIGNATURE_BYTES = 64  # Ed25519
MAX_WAIT_S = 25.0
MAX_ABORT_REASON = 64


class SecAggFailure(Exception):
    """Unmasking cannot produce a trustworthy sum; the round is abandoned with `reason`."""

    def __init__(self, reason: str, detail: str, offenders: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.offenders = list(offenders or [])  # named even when the round fails (see recover_sum)


@dataclasses.dataclass(frozen=True)
class SecAggState:
    """One round's protocol state (a secagg_rounds row, parsed). Shared between threads: never mutated."""

    round_id: int
    session: str  # random, binds every key, signature and ciphertext to this round
    stage: str  # one of STAGES, or "failed"
    stage_deadline: float | None
    quantization: sm.Quantization
    graph_k: int
    graph_seed: str | None
    threshold: int | None
    u1: list[str] | None  # advertised keys (sorted)
    u2: list[str] | None  # shared keys
    u3: list[str] | None  # masked inputs
    sum_file: str | None  # the running modular sum of the masked inputs
    sum_count: int
    result_file: str | None  # the unmasked, de-quantized sum (float64)
    info: dict[str, Any]
    cleaned: bool

    def ready_after(self, stage: str) -> bool:
        """Whether `stage` has closed (the views of what it collected can answer)."""
        return self.stage in STAGES and STAGES.index(self.stage) > STAGES.index(stage)

    @property
    def dropped(self) -> set[str]:
        """Devices that shared keys but sent no masked input (their masks must be removed)."""
        return set(self.u2 or ()) - set(self.u3 or ())


@dataclasses.dataclass(frozen=True)
class Advance:
    stage: str
    deadline: float | None
    fields: dict[str, Any]  # columns of the round's row to set with the stage
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Fail:
    reason: str  # "<reason>: <detail>"; the round is abandoned with <reason>
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)  # the stage's tally, for the round's outcome


def _counts(stage: str, eligible: int, submitted: int, needed: int) -> dict[str, Any]:
    """A stage's outcome counts when it closed at its deadline: whoever did not answer dropped out."""
    return {"secagg_stage": stage, "eligible": eligible, "submitted": submitted,
            "dropped": max(0, eligible - submitted), "pending": 0, "needed": needed}


# ---------------------------------------------------------------------- parameters of a round
def quantization_for(params: TrainParams, bound: UploadBound, dim: int) -> sm.Quantization:
    return sm.choose_quantization(params.clip_norm, bound.noise_stddev, dim, params.max_admitted,
                                  bits=int(params.secagg_bits), headroom_bits=int(params.secagg_headroom_bits),
                                  sigmas=float(params.norm_sigmas))


def min_participants(params: TrainParams) -> int:
    return int(max(params.min_count, params.secagg_min_participants, 2))


def task_params(rnd: Round, state: SecAggState) -> dict[str, Any]:
    """The "secure_aggregation" part of a SecAgg round's train task."""
    p = rnd.train
    base = f"/v1/rounds/{rnd.id}/secagg"
    return {
        "protocol": sm.PROTOCOL, "version": sm.PROTOCOL_VERSION, "round_id": rnd.id, "session": state.session,
        "bits": state.quantization.bits, "quantization": state.quantization.to_dict(),
        "threshold_fraction": float(p.secagg_threshold), "neighbors": state.graph_k,
        "min_participants": int(max(p.min_count, p.secagg_min_participants)),
        "stage_timeout_s": float(p.secagg_stage_s),
        "urls": {"state": base, "advertise_keys": f"{base}/advertise_keys", "share_keys": f"{base}/share_keys",
                 "masked_input": f"{base}/masked_input", "consistency": f"{base}/consistency",
                 "unmasking": f"{base}/unmasking", "abort": f"{base}/abort", "identity": "/v1/devices/identity",
                 "registry": "/v1/devices/{device_id}/identity"},
    }


def summary(state: SecAggState) -> dict[str, Any]:
    return {"protocol": sm.PROTOCOL, "stage": state.stage, "threshold": state.threshold,
            "neighbors": state.graph_k, "bits": state.quantization.bits, "scale": state.quantization.scale,
            "n_u1": len(state.u1 or []), "n_u2": len(state.u2 or []), "n_u3": len(state.u3 or []), **state.info}


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


# ---------------------------------------------------------------------- stage transitions
def close_advertise(state: SecAggState, params: TrainParams, advertisers: list[str], now: float,
                    graph_seed: str | None = None, admitted: int = 0) -> Advance | Fail:
    """U1 = the advertisers; fixes the neighbour graph and the threshold t. `admitted`: for the counts."""
    u1 = sorted(advertisers)
    need = min_participants(params)
    if len(u1) < need:
        return Fail(f"secagg_too_few_keys: {len(u1)} devices advertised keys, {need} needed",
                    _counts("advertise", max(admitted, len(u1)), len(u1), need))
    seed = graph_seed or secrets.token_hex(16)
    graph = sm.neighbours(u1, state.graph_k, seed)
    holders = min(len(v) for v in graph.values()) + 1
    t = sm.threshold_for(holders, float(params.secagg_threshold))
    return Advance("share", now + params.secagg_stage_s, {"u1": u1, "graph_seed": seed, "threshold": t},
                   {"n_u1": len(u1), "threshold": t, "holders_per_secret": holders})


def close_share(state: SecAggState, params: TrainParams, sharers: list[str], now: float,
                round_deadline: float | None) -> Advance | Fail:
    """U2 = the devices that shared keys; masked inputs run to the round deadline (devices train)."""
    u2 = sorted(sharers)
    need = max(state.threshold or 0, min_participants(params))
    if len(u2) < need:
        return Fail(f"secagg_below_threshold: {len(u2)} devices shared keys, {need} needed",
                    _counts("share", len(state.u1 or ()), len(u2), need))
    deadline = max(round_deadline or 0.0, now + params.secagg_stage_s)
    return Advance("masked", deadline, {"u2": u2}, {"n_u2": len(u2)})


def close_masked(state: SecAggState, params: TrainParams, contributors: list[str], now: float) -> Advance | Fail:
    """U3 = the devices whose masked input is in the sum."""
    u3 = sorted(contributors)
    need = max(state.threshold or 0, min_participants(params))
    if len(u3) < need:
        return Fail(f"secagg_below_threshold: {len(u3)} masked inputs, {need} needed",
                    _counts("masked", len(state.u2 or ()), len(u3), need))
    return Advance("consistency", now + params.secagg_stage_s, {"u3": u3},
                   {"n_u3": len(u3), "dropped_after_sharing": len(state.u2 or []) - len(u3)})


def close_consistency(state: SecAggState, params: TrainParams, n_signed: int, now: float) -> Advance | Fail:
    if n_signed < (state.threshold or 0):
        return Fail(f"secagg_below_threshold: {n_signed} consistency signatures, {state.threshold} needed",
                    _counts("consistency", len(state.u3 or ()), n_signed, int(state.threshold or 0)))
    return Advance("unmask", now + params.secagg_stage_s, {}, {"n_signed": n_signed})


def close_unmask(state: SecAggState, n_unmask: int, n_signed: int = 0) -> Advance | Fail:
    """`n_signed`: the devices that may unmask (the consistency signers), for the counts."""
    if n_unmask < (state.threshold or 0):
        return Fail(f"secagg_below_threshold: {n_unmask} devices sent unmasking shares, {state.threshold} needed",
                    _counts("unmask", max(n_signed, n_unmask), n_unmask, int(state.threshold or 0)))
    return Advance("finishing", None, {}, {"n_unmask": n_unmask})


# ---------------------------------------------------------------------- failing fast on known dropouts
@dataclasses.dataclass(frozen=True)
class Tally:
    """Where the current stage stands, in counts: who may answer it, who did, who is known gone."""

    stage: str
    eligible: int  # may answer this stage: admitted (advertise), U1 (share), U2 (masked), U3 (consistency),
    #                the consistency signers (unmask)
    submitted: int  # answered it
    dropped: int  # eligible, did not answer, and reported leaving the round: will never answer
    left_after: int  # answered it, then reported leaving: counts for this stage, not for the later ones
    needed: int  # answers this stage needs (its close rule)
    needed_later: int  # devices the later stages need still there
    open_slots: int = 0  # admission slots still free (advertise only: more devices may yet join)

    @property
    def pending(self) -> int:
        """Who may still answer: eligible devices that neither answered nor left, and free slots."""
        return max(0, self.eligible - self.submitted - self.dropped) + self.open_slots

    @property
    def alive(self) -> int:
        """Who can still take part in the later stages."""
        return self.submitted - self.left_after + self.pending

    def counts(self) -> dict[str, Any]:
        return {"secagg_stage": self.stage, "eligible": self.eligible, "submitted": self.submitted,
                "dropped": self.dropped + self.left_after, "pending": self.pending, "needed": self.needed}


def stage_needs(state: SecAggState, params: TrainParams) -> tuple[int, int]:
    """(answers the current stage needs, devices still there the later stages need), as the close_*
    rules count them. Before U1 is known the threshold is not either: the advertise stage counts only
    the minimum of participants."""
    mp, t = min_participants(params), int(state.threshold or 0)
    return {"advertise": (mp, mp), "share": (max(t, mp), max(t, mp)), "masked": (max(t, mp), t),
            "consistency": (t, t), "unmask": (t, 0)}.get(state.stage, (0, 0))


def threshold_reachable(tally: Tally) -> bool:
    """Whether the stage can still close with enough answers, and enough devices stay for the next ones."""
    return tally.submitted + tally.pending >= tally.needed and tally.alive >= tally.needed_later


def decide_early(tally: Tally) -> Fail | str | None:
    """Before the stage's deadline: a Fail when its threshold can no longer be reached (waiting would only
    keep the fleet idle), "close" when nobody else can answer (the stage's close rule then decides), None
    to wait."""
    if not threshold_reachable(tally):
        short = (f"{tally.needed} needed" if tally.submitted + tally.pending < tally.needed else
                 f"{tally.alive} devices left for the later stages, {tally.needed_later} needed")
        return Fail(f"secagg_threshold_unreachable: {tally.stage} stage: {tally.submitted} of {tally.eligible} "
                    f"answered, {tally.dropped + tally.left_after} dropped out, {tally.pending} can still answer; "
                    f"{short}", tally.counts())
    return "close" if tally.pending == 0 else None


# ---------------------------------------------------------------------- device messages
def parse_advertise(body: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """(c_pk, s_pk, signature) of an advertise_keys message."""
    try:
        c_pk = sm.unb64(str(body.get("c_pk", "")), 32)
        s_pk = sm.unb64(str(body.get("s_pk", "")), 32)
        sig = sm.unb64(str(body.get("signature", "")), 64)
    except sm.SecAggMathError as exc:
        raise Rejection("bad_request", f"advertise_keys: {exc}", status=422) from None
    if c_pk == s_pk:
        raise Rejection("bad_request", "c_pk and s_pk must differ", status=422)
    return c_pk, s_pk, sig


def key_problem(c_pk: bytes, s_pk: bytes) -> str | None:
    """Why a device's advertised X25519 keys are unusable (None: fine). Low-order or non-canonical keys
    would make every agreement with them a secret the server knows too."""
    problems = [f"{name} is {p}" for name, p in (("c_pk", sm.x25519_key_problem(c_pk)),
                                                  ("s_pk", sm.x25519_key_problem(s_pk))) if p]
    return problems[0] if problems else None


def offender(device_id: str, stage: str, reason: str, detail: str, reported_by: list[str] | None = None
             ) -> dict[str, Any]:
    """One entry of a round's offender list (the round's secagg info "offenders", shown to the admin)."""
    out = {"device_id": device_id, "stage": stage, "reason": reason, "detail": detail[:300]}
    return {**out, "reported_by": sorted(reported_by)} if reported_by else out


def parse_shares(body: Mapping[str, Any], want: set[str]) -> tuple[list[tuple[str, bytes, bytes]], str]:
    """([(recipient, ciphertext, signature)], b_commitment) of a share_keys message: one share per neighbour
    in `want`, each signed by the sender (models.secagg_math.share_message; the caller checks the signatures)."""
    shares = body.get("shares")
    commit = body.get("b_commitment")
    if not isinstance(shares, list) or not isinstance(commit, str) or len(commit) != 64:
        raise Rejection("bad_request", "share_keys needs {shares: [{to, ct, sig}], b_commitment: sha256 hex}",
                        status=422)
    out: list[tuple[str, bytes, bytes]] = []
    seen: set[str] = set()
    for s in shares:
        to, ct, sig = (s.get("to"), s.get("ct"), s.get("sig")) if isinstance(s, dict) else (None, None, None)
        if not isinstance(to, str) or to not in want or to in seen or not isinstance(ct, str) \
                or not isinstance(sig, str):
            raise Rejection("bad_request", f"share addressed to {to!r}: not a neighbour, repeated or unsigned",
                            status=422)
        try:
            blob, signature = sm.unb64(ct), sm.unb64(sig, SIGNATURE_BYTES)
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"share to {to}: {exc}", status=422) from None
        if len(blob) > MAX_SHARE_CT:
            raise Rejection("bad_request", f"share to {to} is too large", status=422)
        seen.add(to)
        out.append((to, blob, signature))
    if seen != want:
        raise Rejection("bad_request", f"shares must go to every neighbour ({len(want)}), got {len(seen)}", status=422)
    return out, commit


def split_signed_share(stored: bytes) -> tuple[bytes, bytes]:
    """(signature, ciphertext) of a share as stored (store.add_shares)."""
    return stored[:SIGNATURE_BYTES], stored[SIGNATURE_BYTES:]


def parse_abort(body: Mapping[str, Any]) -> str:
    """The reason of an abort message (the device left the round): a short machine-readable string."""
    reason = body.get("reason", "unspecified")
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_ABORT_REASON:
        raise Rejection("bad_request", f"abort needs {{reason: string of 1..{MAX_ABORT_REASON} characters}}", status=422)
    return reason


def parse_signature(body: Mapping[str, Any]) -> bytes:
    try:
        return sm.unb64(str(body.get("signature", "")), 64)
    except sm.SecAggMathError as exc:
        raise Rejection("bad_request", f"consistency: {exc}", status=422) from None


def unmask_wants(state: SecAggState, graph: Mapping[str, list[str]], device_id: str) -> tuple[set[str], set[str]]:
    """Whose shares a survivor must reveal: of b_v for every survivor v it holds a share of (itself
    included), of s_sk_v for every dropped v it holds a share of."""
    u3 = set(state.u3 or ())
    want_b = {v for v in u3 if v == device_id or device_id in graph[v]}
    want_s = {v for v in state.dropped if device_id in graph[v]}
    return want_b, want_s


def parse_unmask(body: Mapping[str, Any], want_b: set[str], want_s: set[str], me: str | None = None
                 ) -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
    """(b_shares, s_shares, pair_seeds, complaints) of an unmasking message: shares of b_v for `want_b`,
    of s_sk_v for `want_s`. A share the device never got (it failed to decrypt: v cheated, or the relay
    altered it) is listed in complaints {v: reason} instead, with the pairwise seed s_uv it masked with for
    a dropped v, or for a survivor v whose own signed share failed (device_app.secagg unmask_body says why
    that reveals nothing of an honest survivor's input)."""
    b_sh, s_sh = body.get("b_shares"), body.get("s_shares")
    p_sh, comp = body.get("pair_seeds") or {}, body.get("complaints") or {}
    if not all(isinstance(x, dict) for x in (b_sh, s_sh, p_sh, comp)) or not set(b_sh) <= want_b \
            or not set(s_sh) <= want_s or not set(p_sh) <= (want_s - set(s_sh)) | (want_b - set(b_sh)) \
            or (me in want_b and me not in b_sh):
        raise Rejection("bad_request", f"unmasking needs b_shares for {sorted(want_b)} and s_shares for "
                                       f"{sorted(want_s)}", status=422)
    missing = (want_b - set(b_sh)) | (want_s - set(s_sh))
    if set(comp) != missing or not all(isinstance(r, str) and 0 < len(r) <= MAX_ABORT_REASON for r in comp.values()):
        raise Rejection("bad_request", f"unmasking: a share left out must be listed in complaints {{v: reason}} "
                                       f"(left out: {sorted(missing)})", status=422)
    try:
        for share in list(b_sh.values()) + list(s_sh.values()):
            sm.share_from_bytes(sm.unb64(str(share), sm.SHARE_BYTES))
        for seed in p_sh.values():
            sm.unb64(str(seed), sm.KEY_BYTES)
    except sm.SecAggMathError as exc:
        raise Rejection("bad_request", f"unmasking share: {exc}", status=422) from None
    return b_sh, s_sh, p_sh, comp


# ---------------------------------------------------------------------- reconstruction and unmasking
@dataclasses.dataclass
class Recovered:
    total: np.ndarray  # the de-quantized sum of U3's updates (float64)
    sum_sha256: str
    norm: float
    max_abs_int: int
    dropped_recovered: list[str]
    reconstruct_seconds: float = 0.0
    unmask_seconds: float = 0.0
    offenders: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # named cheaters (protocol.offender)
    removed: list[str] = dataclasses.field(default_factory=list)  # survivors whose inputs were taken out


def recover_sum(state: SecAggState, s_pks: Mapping[str, bytes], commitments: Mapping[str, str],
                unmask_bodies: Mapping[str, Mapping[str, Mapping[str, str]]], masked_sum: np.ndarray,
                graph: Mapping[str, list[str]], dim: int, bound: UploadBound,
                masked_input: Callable[[str], np.ndarray | None] | None = None) -> Recovered:
    """The unmasked, checked sum of the survivors' updates, or SecAggFailure.

    unmask_bodies: device -> {"b": {v: share}, "s": {v: share}, "p": {v: pair seed}, "c": {v: complaint}}
    (parse_unmask). Each self-mask seed must match its commitment, each dropped device's mask key its
    public key; a revealer whose share is off the polynomial is left out (other t shares are tried) and
    named, as are devices whose holders could not decrypt their shares (complaints): `offenders`.

    A survivor whose self-mask seed cannot be rebuilt because it sent its holders bad shares (under its
    own signature: models.secagg_math.SENDER_FAULTS) is taken out: masked_input(v) (its masked vector as
    uploaded, kept until the round closes) is subtracted and its pairwise masks removed with the seeds its
    neighbours revealed; the sum is then that of the honest survivors (`removed`).

    The lifted sum must be within the range and norm honest inputs can reach (a mask left in makes it
    uniform garbage). These bound the SUM, the only place the server can: a masked input shows nothing
    of its contribution. What remains is a device's manipulation within the per-device bound: it can
    still send any vector of norm up to clip plus the noise tolerance (a crafted update rather than a
    trained one), summed like an honest one; one beyond the bounds makes the round fail here
    (secagg_integrity) without naming it. Bounding each input needs a per-device zero-knowledge range proof."""
    t0 = time.perf_counter()
    rid, q, t = state.round_id, state.quantization, int(state.threshold or 0)
    index = {u: i + 1 for i, u in enumerate(state.u1 or [])}
    device_at = {x: u for u, x in index.items()}
    u3 = list(state.u3 or [])
    b_points: dict[str, dict[int, int]] = {v: {} for v in u3}
    s_points: dict[str, dict[int, int]] = {v: {} for v in state.dropped}
    pair_seeds: dict[str, dict[str, bytes]] = {}  # v -> {surviving neighbour u: s_uv}
    complaints: dict[str, dict[str, str]] = {}  # accused v -> {reporter: reason}
    for device, body in unmask_bodies.items():
        x = index[device]
        for v, share in body["b"].items():
            b_points[v][x] = sm.share_from_bytes(sm.unb64(share))
        for v, share in body["s"].items():
            s_points[v][x] = sm.share_from_bytes(sm.unb64(share))
        for v, seed in (body.get("p") or {}).items():
            pair_seeds.setdefault(v, {})[device] = sm.unb64(seed, sm.KEY_BYTES)
        for v, why in (body.get("c") or {}).items():
            complaints.setdefault(v, {})[device] = why
    offenders = [_accused(v, by) for v, by in sorted(complaints.items())]
    bad_revealers: set[int] = set()  # share points proven bad: left out of every later reconstruction

    def reconstruct(v: str, pts: dict[int, int], accept: Callable[[bytes], bool], what: str) -> bytes | None:
        """v's secret from the shares revealed for it, leaving out bad revealers (who are named)."""
        usable = {x: y for x, y in pts.items() if x not in bad_revealers}

        def ok(value: int) -> bool:
            return value < (1 << (8 * sm.KEY_BYTES)) and accept(sm.int_to_secret(value))
        try:
            value, bad = sm.shamir_reconstruct_checked(usable, t, ok)
        except sm.SecAggMathError:
            return None
        for x in bad:
            bad_revealers.add(x)
            offenders.append(offender(device_at[x], "unmask", "secagg_bad_revealed_share",
                                      f"its share of device {v}'s {what} is off the polynomial of the others"))
        return sm.int_to_secret(value)

    def fail(v: str, pts: dict[int, int], what: str) -> SecAggFailure:
        usable = len([x for x in pts if x not in bad_revealers])
        if usable < t:
            return SecAggFailure("secagg_below_threshold", f"only {usable} valid shares of device {v}'s {what}, "
                                                           f"{t} needed", offenders)
        return SecAggFailure("secagg_bad_share", f"no {t} of the {usable} shares of device {v}'s {what} reconstruct "
                                                 "it (shares were altered)", offenders)

    def pairs_of(v: str, survivors: set[str]) -> dict[str, bytes] | None:
        """The pairwise seeds every surviving neighbour of v revealed for it, or None if one is missing."""
        need = {u for u in graph.get(v, ()) if u in survivors}
        have = pair_seeds.get(v, {})
        return {u: have[u] for u in need} if need <= set(have) else None

    self_seeds: dict[str, bytes] = {}
    unrecoverable: dict[str, dict[int, int]] = {}
    for v, pts in b_points.items():
        seed = reconstruct(v, pts, lambda b, v=v: secrets.compare_digest(
            sm.commitment(state.session, rid, v, b), commitments[v]), "self-mask seed")
        if seed is None:
            unrecoverable[v] = pts
        else:
            self_seeds[v] = seed
    survivors = set(u3) - set(unrecoverable)
    removed: dict[str, np.ndarray] = {}
    dropped_pairs: dict[str, dict[str, bytes]] = {}
    for v, pts in sorted(unrecoverable.items()):
        at_fault = any(why in sm.SENDER_FAULTS for why in complaints.get(v, {}).values())
        pairs = pairs_of(v, survivors) if at_fault and masked_input is not None else None
        y = masked_input(v) if pairs is not None else None
        if y is None or y.shape != masked_sum.shape or y.dtype != masked_sum.dtype:
            raise fail(v, pts, "self-mask seed")
        removed[v], dropped_pairs[v] = y, pairs
    dropped_sks: dict[str, bytes] = {}
    for v, pts in s_points.items():
        sk = reconstruct(v, pts, lambda k, v=v: sm.x25519_public(k) == s_pks[v], "mask key")
        if sk is not None:
            dropped_sks[v] = sk
            continue
        # v's mask key cannot be rebuilt (it gave bad shares): every surviving neighbour revealed the
        # one pairwise seed it used with v instead
        pairs = pairs_of(v, survivors)
        if pairs is None:
            raise fail(v, pts, "mask key")
        dropped_pairs[v] = pairs
    for v in removed:
        for o in offenders:
            if o["device_id"] == v and o["stage"] == "share":
                o["detail"] = (o["detail"] + "; its masked input was taken out of the sum")[:300]
    t_rec = time.perf_counter()
    total = np.array(masked_sum, copy=True)
    for y in removed.values():
        np.subtract(total, y, out=total)  # unsigned: wraps modulo 2^bits
    ctx = sm.round_context(state.session, rid)
    sm.unmask(total, q.bits, survivors, self_seeds, dropped_sks, s_pks, graph, ctx, sm.PRG(dim, q.bits),
              dropped_pairs)
    lifted = sm.lift(total, q.bits)
    n = len(survivors)
    ok, peak = sm.check_range(lifted, n, q)
    t_unmask = time.perf_counter()
    if not ok:
        raise SecAggFailure("secagg_integrity", f"unmasked sum has a coordinate of {peak}, beyond the "
                            f"{n} x {q.qmax} any honest sum can reach (a masked vector was altered)", offenders)
    sum_sha = hashlib.sha256(memoryview(np.ascontiguousarray(lifted, dtype="<i8"))).hexdigest()  # no copy
    total_f = sm.dequantize(lifted, q)
    norm = float(np.linalg.norm(total_f))
    limit = n * bound.tolerance(dim) + math.sqrt(dim) * n / q.scale
    if norm > limit:
        raise SecAggFailure("secagg_integrity", f"unmasked sum norm {norm:.4g} exceeds {limit:.4g}", offenders)
    return Recovered(total_f, sum_sha, norm, peak, sorted(set(dropped_sks) | (set(dropped_pairs) - set(removed))),
                     t_rec - t0, t_unmask - t_rec, offenders, sorted(removed))


def _accused(v: str, by: Mapping[str, str]) -> dict[str, Any]:
    """The offender entry for a device its holders complained about: a cheater when a complaint proves it
    (its own signed share failed), else a share that did not arrive intact (the relay or the transport)."""
    why = sorted(set(by.values()))
    if any(r in sm.SENDER_FAULTS for r in why):
        return offender(v, "share", "secagg_bad_share_ciphertext",
                        f"{len(by)} of its share holders got no valid share from it ({', '.join(why)})", sorted(by))
    return offender(v, "share", "secagg_share_not_delivered",
                    f"{len(by)} of its share holders got its share altered or not at all ({', '.join(why)})",
                    sorted(by))


__all__ = ["ACTIVE", "GET_READY_AFTER", "MAX_SHARE_CT", "MAX_WAIT_S", "STAGES", "Advance", "Fail", "Recovered",
           "SecAggFailure", "SecAggState", "Tally", "close_advertise", "close_consistency", "close_masked",
           "close_share", "close_unmask", "decide_early", "min_participants", "neighbourhood_warning",
           "key_problem", "offender", "parse_abort", "parse_advertise", "parse_shares", "parse_signature",
           "parse_unmask", "quantization_for", "split_signed_share",
           "recover_sum", "stage_needs", "summary", "task_params", "threshold_reachable", "unmask_wants"]
