"""The aggregation server devices talk to: rounds, validation, versions, rollout, crash safety.

FastAPI + uvicorn, SQLite (WAL) and blob files in one data dir, numpy only (no TensorFlow).

Run
---
    python -m server --data-dir server_data --port 8080 --init-bundle artifacts/baselines/bundle
    python -m server --data-dir /tmp/d --port 0 --port-file /tmp/d.port --init-preset tiny --admin-token s3cret

Every ServerConfig field (server/config.py) is a flag: --round-goal, --min-count, --over-admit, --deadline-s,
--epochs, --batch-size, --learning-rate, --dp-mode {none,central,distributed,local,ftrl}, --clip-norm,
--noise-multiplier, --aggregator {mean,trimmed_mean,median}, --server-optimizer {sgd,momentum,nesterov,adam,yogi,adagrad},
--server-lr, --candidate-eval-fraction, --promotion-tolerance, --secure-aggregation {none,secagg,paillier},
--secagg-threshold, --secagg-neighbors, --secagg-stage-s, --paillier-keyholder-url, --rr-p-first,
--ftrl-rule {restart,min_separation}, --ftrl-restart-rounds, --ftrl-min-separation, --ftrl-max-participations,
--ftrl-adaptive-clip (--ftrl-target-quantile, --ftrl-clip-lr, --ftrl-clip-count-stddev),
--public-status (/status and /metrics without the admin token), ...;
--config FILE.json sets many at once. Paillier's key holder is its own process: python -m server.keyholder.
Admin token: --admin-token, else $FK_ADMIN_TOKEN, else generated into <data-dir>/admin_token.
Registration key (devices need it to register): --registration-key, else $FK_REGISTRATION_KEY, else
generated into <data-dir>/registration_key; --open-registration lets anyone register (docs/security.md).
The deployment's model config and vocabulary are fixed by the first model (--init-bundle DIR, or
--init-preset NAME [--vocab-file vocab.json] with numpy random weights, or POST /v1/admin/init).
HTTPS (tls.py): --tls-cert FILE --tls-key FILE, or --tls-self-signed, which creates <data-dir>/tls_cert.pem
and tls_key.pem (0600) once, reuses them on restart, and prints the certificate's path and SHA-256
fingerprint: devices verify with --ca-file <that path> or --pin-sha256 <fingerprint>. Devices refuse plain
http:// to anything but loopback, so a server devices reach over the network needs one of these.

Modules
-------
HTTP layer (translates requests into service calls; nothing below imports it):
app.py          create_app(config, services): error handlers, auth, every area's routes
http/           helpers.py (bodies, ETags), auth_deps.py, device_routes.py, admin_routes.py (+ /status, /metrics),
                limits.py (the request-limits middleware: body caps, read timeout, per-device concurrency)
contract.py     the OpenAPI contract: ErrorBody, each route's refusals and auth, bounded integers (ApiInt)
__main__.py     argparse + uvicorn;  runtime_tuning.py  uvicorn body handling;  tls.py  HTTPS certificates
Services (built and wired in one place: services.py build_services):
rounds.py       RoundManager: locking, persistence and scheduling: admission + pace steering, uploads,
                deadlines, abandonment; worker.py its background thread
round_close.py  closing rounds into versions: aggregation through the server optimizer, evaluation decisions
admin_ops.py    admin changes of the model line (training start/stop, push, discard, rollback)
versions.py     the model identity and its stored versions;  reporting.py  summaries, status, /metrics text
privacy_account.py  the DP ledger of the global model and the privacy report
ftrl.py         DP-FTRL's durable noise tree and participation record; the participation rule at admission
secagg/         secure aggregation: protocol.py (pure), store.py, service.py, ingest.py, finish.py, routes.py
paillier/       Paillier rounds: protocol.py (pure), store.py, service.py, keyholder_client.py, routes.py;
                keyholder_core.py + keyholder.py: python -m server.keyholder, the separate key holder
telemetry/      randomized-response telemetry: store.py, service.py, routes.py (counts only)
auth.py         registration (key, rate limit, cap), bearer tokens (stored as SHA-256), admin token, revoke/ban
ratelimit.py    per-address token buckets (registration)
host.py         what the privacy services may ask of the round manager (RoundHost)
bootstrap.py    first model from a bundle or a preset
db.py           schema + queries on SQLite (WAL, synchronous=FULL) or PostgreSQL (db_dialect.py), one writer lock
cluster.py      --cluster: the round lock across server processes and the aggregator's lease (advisory locks)
store.py        model / update / optimizer-state files: temp + fsync + rename before the row commits
optimizers.py   models/fedavg.py's server optimizers (sgd ... adagrad) with persisted state;  metrics.py  Prometheus text
status_page.py  HTML + server-rendered SVG (no JavaScript);  config.py  ServerConfig (frozen per round)
Algorithm (pure, no I/O):
round.py        Round, TrainParams, EvalParams: a round as a typed snapshot, built from its row in one place
strategy/       base.py Strategy (task, upload check, aggregate, ledger event), mean.py StreamingMean / Robust
                / SecureSum, dp.py CentralDP / DistributedDP / LocalDP / FtrlDP wrappers, factory.py strategy_for
evaluation.py   evaluation rounds' task, report checks, summary and promotion rule
aggregation.py  streaming (weighted) mean, coordinate-wise trimmed mean and median (numpy)
errors.py       rejection reasons -> HTTP status

HTTP API (all bodies JSON unless noted; auth = "Authorization: Bearer <token>")
--------------------------------------------------------------------------------
POST /v1/devices/register      none    {"registration_key"}           201 {device_id, token, global_version, config_hash}
                                       key required unless --open-registration; 429 rate_limited (+ Retry-After)
                                       per source address; 403 device_cap_reached past --max-devices
GET  /v1/model/info            device  -                              {config, config_hash, vocab_hash, vocab_size,
                                                                       num_parameters, global_version, candidate_version,
                                                                       dp_mode, upload_dtypes, max_upload_bytes, privacy:
                                                                       {epsilon, delta, accountant, dp_rounds, ...}}
GET  /v1/model/vocab           device  -                              models.vocab JSON; ETag = vocab hash, 304 on match
GET  /v1/models/current        device  -                              wire bytes (kind weights); ETag, X-Model-Version; 304
GET  /v1/models/{version}      device  -                              same, any stored version (candidates too), immutable
POST /v1/checkin               device  {"eligibility": {"charging", "unmetered", "idle"}, "model_version"}
                                       -> {"action": "train"|"evaluate"|"retry", "task", "retry_after", "reason",
                                           "global_version"}  (+ Retry-After header on retry)
POST /v1/rounds/{id}/update    device  wire bytes (application/octet-stream), see below
                                       -> 200 {"status": "accepted", round_id, payload_sha256, num_examples, norm}
POST /v1/rounds/{id}/eval      device  {"results": [{"model_version", "num_examples", "recall", "loss", "metrics"?}
                                       for the candidate and the baseline]} -> 200 {"status": "accepted", ...}
GET  /v1/rounds/{id}           device  -                              {id, kind, state, base_version, deadline, goal,
                                                                       admitted, accepted, result_version, ...}
GET  /v1/admin/status|config|rounds[?limit&kind]|rounds/{id}|versions|privacy[?accountant=rdp|pld]
POST /v1/admin/training/start|stop
POST /v1/admin/models[?promote=true&note=...]   wire weights -> {version, state: candidate|global, eval_round_id}
POST /v1/admin/candidate/discard               -> {discarded}
POST /v1/admin/rollback        {"version", "note"?} -> {version (new), rollback_of}
POST /v1/admin/init            {"config", "vocab", "seed"?} (empty server only) -> 201 {version: 1}
GET  /v1/admin/devices/{id}    -> {device_id, created_at, last_seen, state: ok|revoked|banned, reason}
POST /v1/admin/devices/{id}/revoke|ban  {"reason"?}  revoke: its token gets 401 (it may register anew);
                               ban: its token gets 403 banned for good; unban: back to revoked (docs/security.md)
GET  /metrics (Prometheus)  /status (HTML)   admin, or none with --public-status (ServerConfig.public_status)
GET  /healthz  /docs  /openapi.json            none; /openapi.json is the contract: each route's auth
                                               (deviceToken / adminToken / none) and refusals by status
Privacy layer (server/secagg/routes.py, server/paillier/routes.py, server/telemetry/routes.py):
POST /v1/devices/identity      device  {"public_key": Ed25519 b64}   set once, never replaced
GET  /v1/devices/{id}/identity device  the registry peers verify advertised keys against
POST|GET /v1/rounds/{id}/secagg/{advertise_keys|share_keys|masked_input|consistency|unmasking}
                               device  SecAgg stages (GET long-polls ?wait=s until the stage closed)
POST /v1/rounds/{id}/paillier/input, GET /v1/paillier/public_key       Paillier rounds
GET  /v1/telemetry/config, POST /v1/telemetry/rr, GET /v1/admin/telemetry   randomized response

Train task: {type: "train", round_id, base_version, model_url, deadline (unix s), epochs, batch_size,
learning_rate, dp_mode, clip_norm, noise_multiplier, noise_stddev (what this device adds), upload_url,
upload_dtypes, max_upload_bytes, max_examples, config_hash, secure_aggregation}: null for plain rounds,
else the protocol's parameters: secagg {protocol, version, session, quantization {bits, scale, bound, qmax,
n_max}, threshold_fraction, neighbors, min_participants, stage_timeout_s, urls}; paillier {protocol,
public_key (signed by the key holder), keyholder_url, packing, upload_url}.
Evaluate task: {type: "evaluate", round_id, candidate_version, baseline_version, model_urls, report_url, deadline}.
Retry reasons: ineligible, not_initialized, training_stopped, no_round, aggregating, round_full, already_participated,
awaiting_release (release gating: the last trained version is in its evaluation round; training resumes after),
participation_limit (dp_mode ftrl: the device took part too recently for the participation rule; retry_after
estimates when it may: the rounds still to be released times a recent round's length, at most retry_max_s),
not_selected (selection_q: the device is outside this round's secret cohort draw; retry_after: when the round
is expected to end).

Update upload
-------------
Body = models.wire.encode(delta, config, kind="delta", model_version=<task base_version>,
dtype=float32|float16|int8|int16, metadata={"num_examples": int >= 1, "metrics": {name: number}}).
delta = locally trained weights - base weights, clipped to clip_norm and noised with noise_stddev by the
device. The example count and metrics ride in the wire metadata (covered by the checksum).
Validation, in order: auth, round exists, device admitted (these before the body is read); size; same
device already uploaded (same bytes -> the original 200 again, other bytes -> 409 duplicate_upload);
round open and before its deadline;
wire framing + SHA-256 checksum; config hash; tensor names/shapes; kind delta; base version; dtype allowed;
all finite; metadata; L2 norm <= clip + noise tolerance (models.dp.norm_tolerance) + quantization error.
Large bodies: send with Content-Length, and from httpx as an iterator of ~256 KB chunks (httpcore copies
the rest of a `bytes` body after each partial socket send, which is quadratic under load).

Rejections: 4xx (503: not_initialized, keyholder_unavailable) {"error": reason, "detail": "..."}, the
ErrorBody of the OpenAPI document; integers in paths, queries and bodies are bounded to +-(2^53 - 1) (422
bad_request beyond); reasons in server/errors.py (unauthorized, forbidden,
not_admitted, unknown_round, round_closed, stale_base_version, duplicate_upload, config_mismatch,
too_large, truncated, bad_magic, unsupported_format_version, corrupt_header, checksum_mismatch,
shape_mismatch, non_finite, unsupported_dtype, wrong_kind, norm_exceeded, bad_metadata, bad_report,
bad_request, ...). A rejection changes nothing: no row, no file, no aggregate.

Request limits (http/limits.py, before any route): each body is capped while it is read, and a declared
Content-Length over the cap is refused unread: 413 too_large. Caps: the upload routes (update, SecAgg
masked_input, Paillier input) the model-sized max_upload_bytes (x4 + 1 MiB for Paillier); SecAgg stage
messages --max-secagg-body-bytes (64 KiB + 2 KiB per cohort member); POST /v1/admin/init
--max-admin-body-bytes (16 MiB, admin token checked first); every other route --max-control-body-bytes
(64 KiB). A body with no byte for --body-idle-timeout-s (30) or averaging under --body-min-rate (4096 B/s)
after that is cut: 408 read_timeout. Uploads and long-polls (?wait=) are refused before the body is read
or the wait begins unless the token is valid and the device admitted to the round (401, 403 not_admitted);
one device holds --max-uploads-per-device (2) uploads and --max-long-polls-per-device (2) long-polls at
once: 429 too_many_concurrent (+ Retry-After). An answer sent before the body ended closes the connection.

Rounds, aggregation, privacy
----------------------------
open -> aggregating -> closed | abandoned. The deadline starts at the first admission. Admission up to
ceil(goal * over_admit); at goal, or at the deadline with >= min_count updates, the round aggregates;
below min_count at the deadline it is abandoned and a new round opens on the same base.
Mean: uniform for DP rounds, example-weighted otherwise, streamed into one float64 sum; trimmed_mean /
median (dp_mode none or local only) read the stored updates chunk by chunk. Server optimizer turns the
aggregate into a new version; DP rounds add (noise_multiplier, q) to the dp_accounting ledger and the round
records the cumulative epsilon at dp_delta (1e-6 by default). q = selection_q when set: DP-FedAvg's cohort is
then a secret Poisson draw (HMAC-SHA256 of the device id under a key from the round's secret seed < q * 2^256;
strategy/dp.py), no goal or admission cap cuts it first-come (the round runs to its deadline) unless
selection_max_cohort caps it (accounted at sensitivity 2C). Without selection_q, q = 1: no amplification.
Every privacy report (/v1/admin/privacy, /v1/model/info, /v1/admin/status) names the mechanism and carries a
`guarantee` sentence (models.dp.guarantee_sentence).
Evaluation rounds send a staged candidate to candidate_eval_fraction of devices; it is promoted (as a new
version) only if its recall >= the baseline's - promotion_tolerance. With release_gate eval (the default) a
version a training round produced goes through the same evaluation before it is served: released (it becomes
global) or held back with the reason (/v1/admin/versions release_state / release_reason). Promotion, rollback and admin pushes
abandon the open training round (reason global_changed) and reset the optimizer state.

Secure aggregation (secure_aggregation secagg | paillier; aggregator mean, clip_norm > 0): the server never
holds an individual update, only a running modular (or encrypted) sum, written durably before the 2xx,
and the contributor rows (no file); the mean is uniform (sum / contributors). secagg + dp_mode distributed
is the private default: each device adds N(0, (z C)^2 / min_count), the unmasked sum of >= min_count
carries the central noise and the ledger reports epsilon for it; /v1/admin/privacy also reports the
local epsilon of one upload alone (the guarantee of dp_mode local). A round whose protocol fails
(below threshold, a tampered share or masked vector, a refused decryption) is abandoned: nothing released.

DP-FTRL (dp_mode ftrl; server/ftrl.py, strategy/dp.py FtrlDP; Kairouz et al. 2021): devices clip only;
the server adds models/dp_ftrl.py's tree residual noise (nodes N(0, (z C)^2), Honaker's efficient tree by
default) to the round's sum, so the released models are FTRL (sgd) or DP-FTRLM (momentum; other server
optimizers are refused). Released rounds are the tree's leaves. The participation rule is enforced at
admission from SQLite (ftrl_participation, written with the round's close, so it survives restarts):
ftrl_rule restart (default): each device in at most one round per ftrl_restart_rounds-round period, the
tree restarted after every period; ftrl_rule min_separation: one tree, at most ftrl_max_participations
rounds per device, at least ftrl_min_separation rounds strictly between two. /v1/admin/privacy reports
mechanism "DP-FTRL", models.dp.ftrl_epsilon for exactly that rule at delta 1e-6 (unless dp_delta), and a
`guarantee` sentence. The tree state file is durable before the closing transaction points at it; its
noise is a function of the secret seed (the first DP-FTRL round's) and the draw index, so a round
aggregated again after a crash releases the same sum. The tree's z, clip and rule are fixed for a data dir.
The rule costs liveness: with restart, a period needs ftrl_restart_rounds * round_goal distinct devices
(choose ftrl_restart_rounds <= eligible devices / round_goal), or rounds run short and are abandoned.
Adaptive clipping (--ftrl-adaptive-clip, TFF's tree_adaptive; not with secure aggregation): clip_norm is
the initial clip; each task carries the clip in use and the quantile estimate (clip_estimate), each device
reports one bit in its update's metrics (below_clip_estimate: its norm before clipping <= the estimate), the
estimate moves every round by the count plus tree noise (stddev ftrl_clip_count_stddev, default round_goal
/ 20) toward ftrl_target_quantile of the norms, and the clip in use becomes the estimate when the trees
restart. Updates get noise multiplier z_v with z_v^-2 + (2 sigma)^-2 = z^-2: the ledger's z covers both.

Crash safety: an accepted update's file is fsynced and renamed, then its row commits (fsync), then the
200 goes out. After kill -9 the open round resumes with every accepted update (the running sum is
rebuilt from the files in acceptance order, bit-identically); a round caught aggregating is aggregated
again; unreferenced files are deleted. Individual updates are deleted once their round closes.
"""
