"""Secure aggregation, server side (Bonawitz et al. 2017, with the optional neighbour graph of SecAgg+,
Bell et al. 2020). Math in models/secagg_math.py.

    protocol.py   the protocol as pure functions: state, stage transitions, message checks, recover_sum
    store.py      its tables and queries (install_schema, SecAggStore)
    service.py    SecAggService: the protocol applied to requests, with locking and durable writes
    identity.py   the device identity registry (Ed25519 keys, set once, never replaced)
    ingest.py     stage 3: masked inputs into the durable running modular sum (group commit)
    running_sum.py  that sum in memory: staging, group commit, one claim per device
    finish.py     the unmasking thread
    dropouts.py   devices that report leaving a round; a stage decided before its deadline
    waiters.py    long-poll support
    routes.py     the HTTP routes (identity registry, the five stages, abort)

A training round whose params say secure_aggregation = "secagg" runs these stages, each closed by its
own rule or its own deadline (the stage deadline is secagg_stage_s, except masked_input which runs to
the round deadline so devices can train):

    advertise_keys  POST: {c_pk, s_pk, signature}, the signature by the device's registered Ed25519
                    identity key over (session, round, device, keys). Closes when every admission slot
                    advertised, or at its deadline with >= max(min_count, secagg_min_participants).
                    U1 = advertisers (sorted); threshold t and the neighbour graph are fixed here.
                    A low-order, non-canonical or repeated key is refused and its device excluded.
                    Admission to the round ends with this stage.
    share_keys      POST: {shares: [{to, ct, sig}], b_commitment}: one AES-GCM ciphertext per neighbour,
                    each signed by the sender's identity key (checked here: a bad one puts the sender out),
                    relayed unread. Closes when all of U1 shared, or at its deadline with >= t. U2.
    masked_input    POST (binary FKSA frame): y_u mod 2^bits. Added to the round's running modular sum
                    on arrival; the sum is written durably (temp, fsync, rename), then the contributor
                    row commits, then the 200. y_u is kept in its own file until the round closes. Closes when all of U2 uploaded or the
                    round goal is reached, or at the round deadline with >= max(t, min_count). U3.
    consistency     POST: {signature over U3}. Closes when all of U3 signed, or at its deadline with >= t.
    unmasking       POST: {b_shares: {v: share}, s_shares: {v: share}}: for survivors v the share of b_v,
                    for dropped v (U2 \\ U3) the share of s_sk_v (a share never received: complaints {v:
                    reason}, and pair_seeds {v: s_uv} for a dropped v or a survivor whose own signed share
                    failed). Closes when every signer answered, or at
                    its deadline with enough shares. Then the server reconstructs, checks every secret
                    (b_v against the device's commitment, s_sk_v against its advertised s_pk), removes
                    the masks, checks that the lifted sum is in range (no mask left: an altered masked
                    vector or share makes the sum uniform garbage), and stores the de-quantized sum.
                    The round then aggregates like any other (server optimizer, DP ledger, new version).

Every GET of a stage long-polls (?wait=seconds) until the stage is closed and then answers what
the device needs next; a failed or abandoned round answers 409 round_closed.

What the server stores for a SecAgg round: the public keys and signatures, the encrypted shares it
relays (it cannot read them), the seed commitments, one running modular sum (the previous sum file is
replaced, not kept), each masked vector as uploaded (uniform in the ring without seeds the protocol never
reveals for an honest survivor; kept so that a cheater's can be taken out), the contributor list (device,
payload SHA-256, example count, training metrics, no content), and after unmasking the shares revealed for
reconstruction and the unmasked sum. Everything but the contributor list and a summary is deleted
when the round closes or is abandoned.

No silent waits: a device that gives up (a local error, a failed check, training stopped) posts
abort {reason}. When every device that may answer the current stage has answered or left, the stage
closes at once; when those that answered plus those that still can are below its threshold (or too few
remain for the later stages), the round is abandoned at once (secagg_threshold_unreachable, the counts
eligible / submitted / dropped / pending / needed in its outcome) and the next round opens, instead of
the fleet waiting out the deadline. Devices that vanish without a word are known at the stage deadline.

Failure is safe: below threshold at any stage, a secret that no t revealed shares rebuild to match its
commitment or public key, or an unmasked sum out of range abandons the round (nothing released).

A cheating peer (issue #18) is excluded and named instead of costing the round, where the protocol can
tell who cheated: advertised keys of small order, non-canonical or already advertised by another device
are refused (secagg_bad_key, secagg_duplicate_key) and the device is out of the round, like one that
left; so is a device whose masked input is outside what the protocol allows (another ring or length,
metadata out of range), and one whose encrypted shares are not signed by it. Devices treat a peer whose
encrypted share fails (or is missing) as a dropped holder: they go on, list it in their unmasking message
(complaints) and reveal the one pairwise seed they masked with it if it dropped, or if it survived but
its own signature is on the ciphertext that failed (an honest device never signs one; the relay cannot
forge one). A survivor whose self-mask seed then cannot be rebuilt is taken out: its kept masked input is
subtracted and its pairwise masks removed with those seeds, and the round ends with the honest
survivors' sum ("removed"). Reconstruction leaves out revealed shares that are off the others'
polynomial (protocol.recover_sum). Every offender is recorded in the round's info ("offenders":
device, stage, reason, detail, reported_by), kept with the summary the admin's round view shows.
Limits: a cheater that gives valid shares to some holders and bad ones to others, so that fewer than t
valid shares remain while some holders hold one (and so reveal no pairwise seed), still makes the round
fail, though it is named (the holders would need the other complaints proven to them, which takes a
verifiable decryption); and any device can still send any input within the per-device bound
(protocol.recover_sum), which masking hides by design.

Trust and identity: the device's identity key is registered once (POST /v1/devices/identity) and can
never be replaced; devices verify every peer's advertised keys against the peer's identity key and pin
identity keys they have seen (trust on first use), so a server cannot substitute its own keys for a
peer's inside a round, nor swap a known device's identity later. A server that lies in the registry
about a device never seen before is outside this model; it needs an external PKI (e.g. platform key
attestation or a key-transparency log). A MAC under the device's bearer token would not help: peers
cannot verify it, and the server (which stores only hashes of tokens) could not either.
"""
from server.secagg.protocol import GET_READY_AFTER, STAGES, SecAggFailure, neighbourhood_warning
from server.secagg.service import SecAggService
from server.secagg.store import install_schema

__all__ = ["GET_READY_AFTER", "STAGES", "SecAggFailure", "SecAggService", "install_schema", "neighbourhood_warning"]
