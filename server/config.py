"""Server configuration: one dataclass, filled from defaults, a JSON file, flags and environment.

Round parameters are copied into each round when it opens (rounds.params), so changing the
configuration and restarting never changes a round that is already running.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from models.dp import ACCOUNTANTS, DEFAULT_DELTA, DP_MODES, FTRL_RULES
from models.dp_ftrl import adaptive_value_noise_multiplier
from models.dp_noise_check import DEFAULT_MAX_NOISE_TO_CLIP
from models.fedavg import SERVER_OPTIMIZERS, FedAvgHyperparams, task_fields
from models.lr_schedule import DEFAULT_GAMMA, DEFAULT_MIN_LR_FRACTION, LrSchedule
from server.auth import ensure_secret_file
from server.db_url import POSTGRES_SCHEMES, redact_url

AGGREGATORS = ("mean", "trimmed_mean", "median")
SERVER_DP_MODES = (*DP_MODES, "ftrl")  # ftrl: central DP-FTRL, tree-aggregated noise (server/strategy/dp.py FtrlDP)
FTRL_OPTIMIZERS = ("sgd", "momentum")
SECURE_AGGREGATION = ("none", "secagg", "paillier")
SELECTION_DP_MODES = ("central", "distributed", "local")  # DP-FedAvg: the modes --selection-q applies to
# An uncapped selection round's frozen goal and max_admitted: never reached, so the cohort is the draw.
SELECTION_UNCAPPED = 1_000_000_000
KEYHOLDER_TOKEN_ENV = "FK_KEYHOLDER_TOKEN"
WIRE_DTYPES = ("float32", "float16", "int8", "int16")
RELEASE_GATES = ("eval", "off")  # eval: a trained version is served only after an evaluation round passes it
ADMIN_TOKEN_ENV = "FK_ADMIN_TOKEN"
REGISTRATION_KEY_ENV = "FK_REGISTRATION_KEY"
REGISTRATION_KEY_FILE = "registration_key"  # in the data dir, generated unless configured (issue #18)


# Other accepted spellings of config keys (files and flags) -> the field. adam_*: the names before
# models/fedavg.py; client_lr / client_epochs: FedAvgHyperparams' names for the fields that keep the
# task's (HTTP contract) names epochs / learning_rate here (models.fedavg.TASK_KEYS).
KEY_ALIASES = {"adam_beta1": "beta1", "adam_beta2": "beta2", "adam_eps": "eps",
               "client_lr": "learning_rate", "client_epochs": "epochs"}


def canonical_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with KEY_ALIASES renamed to their fields; an alias and its field with two values is an error."""
    out = {k: v for k, v in data.items() if k not in KEY_ALIASES}
    for alias, name in KEY_ALIASES.items():
        if alias in data:
            if name in out and out[name] != data[alias]:
                raise ValueError(f"server config gives both {name}={out[name]!r} and its alias {alias}={data[alias]!r}")
            out[name] = data[alias]
    return out


@dataclasses.dataclass
class ServerConfig:
    # --- where
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "server_data"
    db_path: str | None = None  # default: <data_dir>/server.sqlite3
    # PostgreSQL instead of the SQLite file: a postgresql:// URL (also libpq's $PGPASSWORD); blobs stay in data_dir
    database: str | None = None
    cluster: bool = False  # several server processes on that database and a shared data dir (server/cluster.py)

    # --- auth
    admin_token: str | None = None  # --admin-token or $FK_ADMIN_TOKEN; if neither, generated into <data_dir>/admin_token
    registration_key: str | None = None  # devices must present it to register ($FK_REGISTRATION_KEY); see below

    # --- Sybil resistance (issue #18; server/auth.py, server/ratelimit.py, docs/security.md)
    # Registration needs a key: --registration-key, else $FK_REGISTRATION_KEY, else one generated into
    # <data_dir>/registration_key (0600, resolve_registration_key). --open-registration lets anyone register
    # (a warning at start-up; shown in the admin status and config).
    open_registration: bool = False
    registration_rate_per_s: float = 1.0  # per source address: sustained registrations per second (0: no limit)
    registration_burst: int = 100  # per source address: registrations at once before the rate applies
    max_devices: int = 1_000_000  # devices with a valid token (not revoked or banned); more are refused (0: no cap)

    # --- training rounds
    training_on_start: bool = True  # only for a fresh data dir; later the admin start/stop state persists
    round_goal: int = 100  # updates aggregated per round
    min_count: int = 80  # fewest updates a round may close with at its deadline
    over_admit: float = 1.3  # admit up to ceil(goal * over_admit) devices to absorb dropouts
    deadline_s: float = 600.0  # from the round's first admission
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 0.5  # device SGD learning rate
    max_examples_per_update: int = 100_000  # an update claiming more is refused (bad_metadata)

    # --- differential privacy
    dp_mode: str = "none"  # none | central | distributed | local (see models/dp.py) | ftrl (DP-FTRL, below)
    clip_norm: float = 1.0  # L2 bound on each device delta; 0 disables clipping (dp_mode none only)
    noise_multiplier: float = 0.0  # z: total noise stddev on the sum = z * clip_norm
    dp_delta: float = DEFAULT_DELTA  # the delta every epsilon is reported at (1e-6 unless set)
    # DP-FedAvg (dp_mode central / distributed / local): the round's cohort is a secret Poisson draw, each
    # device in it with probability selection_q (server/strategy/dp.py), and the accountant uses that q.
    # None: no draw; the accountant then assumes every device in every round (q = 1, no amplification).
    # With a draw the cohort is not cut first-come: round_goal and over_admit do not apply, the round runs to
    # its deadline (released with >= min_count uploads). selection_max_cohort caps the cohort instead (needed
    # by secure aggregation, which sizes its encoding for it); a capped cohort is accounted at sensitivity 2C.
    selection_q: float | None = None
    selection_max_cohort: int | None = None
    # DP-FTRL (dp_mode ftrl): the participation rule admission enforces and the accountant assumes
    ftrl_rule: str = "restart"  # restart: each device in <= 1 round per period, tree restarted | min_separation
    ftrl_restart_rounds: int = 10  # restart: the period (rounds released per tree)
    ftrl_min_separation: int = 0  # min_separation: rounds strictly between two rounds of a device (one tree)
    ftrl_max_participations: int = 1  # min_separation: rounds a device may ever take part in
    ftrl_efficient: bool = True  # Honaker's efficient tree (TFF's default) or the plain binary tree
    # DP-FTRL adaptive clipping (TFF's tree_adaptive; server/ftrl.py): clip_norm is the initial clip; the clip
    # follows the target quantile of the devices' update norms, changing only when the trees restart
    ftrl_adaptive_clip: bool = False
    ftrl_target_quantile: float = 0.5
    ftrl_clip_lr: float = 0.2  # geometric step of the quantile estimate per round
    ftrl_clip_count_stddev: float | None = None  # noise on the count below the estimate (None: round_goal / 20)
    accountant: str = "rdp"  # rdp | pld
    norm_sigmas: float = 6.0  # how far past E||noise|| an upload's norm may go before norm_exceeded
    # DP noise check (models/dp_noise_check.py, server/dp_sanity.py): refuse to start when the expected norm of a
    # round's noise on the mean (min_count updates) exceeds this many clips, unless allow_noisy_dp (then warn)
    max_noise_to_clip: float = DEFAULT_MAX_NOISE_TO_CLIP
    allow_noisy_dp: bool = False

    # --- secure aggregation (server/secagg/, server/paillier/): none | secagg (Bonawitz et al. masking) | paillier
    secure_aggregation: str = "none"
    secagg_threshold: float = 2 / 3  # fraction of a device's share holders needed to unmask (always > 1/2)
    secagg_neighbors: int = 0  # 0: every device masks with every other (SecAgg); k: k-regular graph (SecAgg+)
    secagg_bits: int = 32  # the ring Z_2^bits the masked sum lives in (32 or 64)
    secagg_headroom_bits: int = 8  # unused top bits: a sum with a mask left in is caught by its range
    secagg_stage_s: float = 60.0  # deadline of each key / consistency / unmasking stage
    secagg_min_participants: int = 3  # fewest devices a SecAgg round proceeds with (and >= min_count)
    paillier_keyholder_url: str | None = None  # python -m server.keyholder; required for paillier
    paillier_keyholder_token: str | None = None  # bearer token for its /v1/decrypt ($FK_KEYHOLDER_TOKEN)
    paillier_value_bits: int = 24  # quantized value width; slots add ceil(log2(n_max + 1)) carry bits

    # --- randomized-response telemetry (server/telemetry/, models/rr.py)
    rr_p_first: float = 0.5  # probability a device answers truthfully
    rr_p_second: float = 0.5  # probability the random answer is "yes"
    rr_questions: tuple[str, ...] = ("suggestion_accepted", "personal_model_used")
    rr_period_s: float = 3600.0  # a device answers each question at most once per period

    # --- aggregation and server optimizer
    aggregator: str = "mean"  # mean (uniform for DP rounds, example-weighted otherwise) | trimmed_mean | median
    trim_fraction: float = 0.1  # trimmed_mean drops this fraction at each end, per coordinate
    # server optimizer, as models/fedavg.py defines it: sgd | momentum | nesterov | adam | yogi | adagrad
    server_optimizer: str = "sgd"
    server_lr: float = 1.0  # sgd with lr 1 is plain FedAvg
    server_momentum: float = 0.9  # momentum / nesterov
    nesterov: bool = False  # deprecated: momentum + nesterov is server_optimizer "nesterov"
    beta1: float = 0.9  # adam / yogi (FedAdam / FedYogi, Reddi et al. 2021)
    beta2: float = 0.99  # adam / yogi
    eps: float = 1e-3  # adam / yogi / adagrad: Reddi et al.'s tau
    # server lr schedule over server steps (models/lr_schedule.py, tff_sim's flags; server/optimizers.py counts)
    server_lr_schedule: str = "constant"  # constant | cosine | step | inverse_sqrt
    server_lr_warmup_rounds: int = 0  # linear warmup over the first N steps
    server_lr_min_fraction: float = DEFAULT_MIN_LR_FRACTION  # cosine: the floor, a fraction of server_lr
    server_lr_total_rounds: int | None = None  # cosine: the steps it decays over (required here)
    server_lr_step_rounds: int | None = None  # step: multiply by server_lr_gamma every N steps
    server_lr_gamma: float = DEFAULT_GAMMA
    client_lr_decay: bool = False  # the task's learning_rate decays with the schedule, without its warmup
    seed: int = 0  # random init of a preset model (central-DP noise uses a secret random seed per round)

    # --- uploads
    max_upload_bytes: int | None = None  # default: float32 delta size + 1 MiB
    upload_dtypes: tuple[str, ...] = WIRE_DTYPES
    keep_update_blobs: bool = False  # delete individual updates once their round is closed
    # Large request bodies (> 1 MiB) read at once; the others wait unread (TCP backpressure), so a
    # burst of N uploads holds upload_slots bodies in memory instead of N.
    upload_slots: int = 16

    # --- request limits (issue #18; server/http/limits.py). Every body is capped while it is read (413
    # too_large: nothing past the cap is buffered); a stalled body is cut (408 read_timeout); one device token
    # holds at most so many uploads / long-polls at once (429 too_many_concurrent). Uploads are capped at the
    # model's size (max_upload_bytes above); every other route at one of these:
    max_control_body_bytes: int = 64 << 10  # JSON control and unauthenticated routes (register, check-in, ...)
    max_admin_body_bytes: int = 16 << 20  # POST /v1/admin/init (config + vocabulary); admin token checked first
    max_secagg_body_bytes: int | None = None  # SecAgg stage messages; default 64 KiB + 2 KiB per cohort member
    body_idle_timeout_s: float = 30.0  # no body byte for this long: 408 read_timeout
    body_min_rate: float = 4096.0  # bytes/s a body must average after its first body_idle_timeout_s (0: off)
    max_uploads_per_device: int = 2  # concurrent upload bodies per device token
    max_long_polls_per_device: int = 2  # concurrent ?wait= requests per device token

    # --- candidates and evaluation
    candidate_eval_fraction: float = 0.1  # share of check-ins (by device hash) that evaluate a staged candidate
    eval_goal: int = 50
    eval_min_count: int = 20
    eval_deadline_s: float = 600.0
    promotion_tolerance: float = 0.0  # promote iff candidate recall >= global recall - tolerance
    promotion_loss_tolerance: float | None = None  # optional: and candidate loss <= global loss + this
    # --- release gating: a version produced by training rounds is evaluated (an evaluation round against
    # the served version, with the tolerances above) before it is served; off: served at once
    release_gate: str = "eval"  # eval | off
    max_rejected_versions: int = 0  # stop training after this many consecutive held-back versions (0: never)

    # --- pace steering (seconds a device is told to wait)
    retry_ineligible_s: int = 600
    retry_idle_s: int = 300  # training stopped, nothing to do
    retry_min_s: int = 5
    retry_max_s: int = 3600

    # --- ops
    tick_s: float = 0.1  # how often deadlines are checked
    # /status and /metrics without a token (they show counts only); default: the admin token is required
    public_status: bool = False
    log_level: str = "info"

    # --- transport security (server/tls.py): HTTPS with a given certificate, or a self-signed one
    tls_cert: str | None = None  # PEM certificate (chain); needs tls_key
    tls_key: str | None = None  # its PEM private key
    tls_self_signed: bool = False  # create once and serve <data_dir>/tls_cert.pem (+ tls_key.pem, 0600)

    def __post_init__(self) -> None:
        self.upload_dtypes = tuple(self.upload_dtypes)
        self.rr_questions = tuple(self.rr_questions)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(f"invalid server config: {message}")

        need(self.round_goal >= 1, "round_goal must be >= 1")
        need(1 <= self.min_count <= self.round_goal, "min_count must be in [1, round_goal]")
        need(self.over_admit >= 1.0, "over_admit must be >= 1")
        need(self.deadline_s > 0 and self.eval_deadline_s > 0, "deadlines must be > 0")
        need(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(self.dp_mode in SERVER_DP_MODES, f"dp_mode must be one of {SERVER_DP_MODES}")
        need(self.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}")
        need(self.clip_norm >= 0 and math.isfinite(self.clip_norm), "clip_norm must be >= 0")
        need(self.noise_multiplier >= 0, "noise_multiplier must be >= 0")
        need(self.max_noise_to_clip > 0 and math.isfinite(self.max_noise_to_clip), "max_noise_to_clip must be > 0")
        if self.dp_mode != "none":
            need(self.clip_norm > 0, "DP modes need clip_norm > 0")
            need(self.noise_multiplier > 0, "DP modes need noise_multiplier > 0")
        if self.dp_delta is None:  # a config file's explicit null: the default
            self.dp_delta = DEFAULT_DELTA
        need(0 < self.dp_delta < 1, "dp_delta must be in (0, 1)")
        need(self.selection_q is None or 0 < self.selection_q <= 1, "selection_q must be in (0, 1]")
        if self.selection_q is not None:
            need(self.dp_mode in SELECTION_DP_MODES, "selection_q is DP-FedAvg's cohort draw (dp_mode central, "
                 "distributed or local); DP-FTRL has its own participation rule")
            need(self.selection_max_cohort is not None or self.secure_aggregation == "none",
                 "secure aggregation sizes its encoding for a bounded cohort: with selection_q set "
                 "selection_max_cohort")
        need(self.selection_max_cohort is None or self.selection_q is not None,
             "selection_max_cohort caps the cohort of selection_q: set selection_q")
        need(self.selection_max_cohort is None or self.selection_max_cohort >= self.min_count,
             "selection_max_cohort must be >= min_count")
        need(self.aggregator in AGGREGATORS, f"aggregator must be one of {AGGREGATORS}")
        need(0 <= self.trim_fraction < 0.5, "trim_fraction must be in [0, 0.5)")
        # Distributed noise only protects a sum, and central noise is calibrated to the mean's
        # sensitivity; a median/trimmed mean of individual updates is private only in local mode.
        need(self.aggregator == "mean" or self.dp_mode in ("none", "local"),
             "robust aggregators (trimmed_mean, median) need dp_mode none or local")
        need(self.server_optimizer in SERVER_OPTIMIZERS, f"server_optimizer must be one of {SERVER_OPTIMIZERS}")
        if self.nesterov and self.server_optimizer == "momentum":  # the deprecated spelling of nesterov
            self.server_optimizer = "nesterov"
        need(self.ftrl_rule in FTRL_RULES, f"ftrl_rule must be one of {FTRL_RULES}")
        need(self.ftrl_restart_rounds >= 1, "ftrl_restart_rounds must be >= 1")
        need(self.ftrl_min_separation >= 0 and self.ftrl_max_participations >= 1,
             "ftrl_min_separation must be >= 0 and ftrl_max_participations >= 1")
        if self.ftrl_adaptive_clip:
            need(self.dp_mode == "ftrl", "ftrl_adaptive_clip needs dp_mode ftrl")
            need(self.secure_aggregation == "none",
                 "ftrl_adaptive_clip needs each device's below-the-estimate bit, which secure aggregation would have "
                 "to sum securely too: not supported; use a fixed clip with secure aggregation")
            need(0 < self.ftrl_target_quantile < 1, "ftrl_target_quantile must be in (0, 1)")
            need(self.ftrl_clip_lr > 0, "ftrl_clip_lr must be > 0")
            need(self.ftrl_clip_count_stddev is None or self.ftrl_clip_count_stddev > 0,
                 "ftrl_clip_count_stddev must be > 0")
            need(self.clip_norm > 0, "ftrl_adaptive_clip needs an initial clip_norm > 0")
            need(self.noise_multiplier == 0 or self.noise_multiplier < 2 * self.clip_count_stddev,
                 f"ftrl_clip_count_stddev {self.clip_count_stddev:g} leaves no noise for the updates at noise "
                 f"multiplier {self.noise_multiplier:g} (needs z < 2 * count stddev)")
        if self.dp_mode == "ftrl":
            need(self.server_optimizer in FTRL_OPTIMIZERS,
                 "DP-FTRL's server step is SGD over the tree residuals (FTRL) or heavy-ball momentum (DP-FTRLM): "
                 f"use --server-optimizer sgd or momentum, not {self.server_optimizer}")
        try:
            self.fedavg  # noqa: B018 - builds (so validates) the FedAvg hyperparameters
            schedule = LrSchedule.from_fields(self)  # validates it
        except ValueError as exc:
            need(False, str(exc))
        need(not self.client_lr_decay or schedule.name != "constant", "client_lr_decay follows the server lr "
             "schedule's decay: set server_lr_schedule (cosine, step or inverse_sqrt)")
        need(self.dp_mode != "ftrl" or schedule.is_constant, "DP-FTRL needs a constant server learning rate (FTRL's "
             "tree noise cancels across rounds only with one lr): drop server_lr_schedule / server_lr_warmup_rounds")
        need(all(d in WIRE_DTYPES for d in self.upload_dtypes) and self.upload_dtypes, "bad upload_dtypes")
        need(self.max_upload_bytes is None or self.max_upload_bytes > 0, "max_upload_bytes must be > 0")
        need(self.upload_slots >= 1, "upload_slots must be >= 1")
        # request limits (issue #18)
        need(self.max_control_body_bytes >= 1024 and self.max_admin_body_bytes >= 1024,
             "max_control_body_bytes and max_admin_body_bytes must be >= 1024")
        need(self.max_secagg_body_bytes is None or self.max_secagg_body_bytes >= 1024,
             "max_secagg_body_bytes must be >= 1024")
        need(self.body_idle_timeout_s > 0 and math.isfinite(self.body_idle_timeout_s), "body_idle_timeout_s must be > 0")
        need(self.body_min_rate >= 0 and math.isfinite(self.body_min_rate), "body_min_rate must be >= 0 (0: off)")
        need(self.max_uploads_per_device >= 1 and self.max_long_polls_per_device >= 1,
             "max_uploads_per_device and max_long_polls_per_device must be >= 1")
        need(0 <= self.candidate_eval_fraction <= 1, "candidate_eval_fraction must be in [0, 1]")
        need(1 <= self.eval_min_count <= self.eval_goal, "eval_min_count must be in [1, eval_goal]")
        need(self.promotion_tolerance >= 0, "promotion_tolerance must be >= 0")
        need(self.release_gate in RELEASE_GATES, f"release_gate must be one of {RELEASE_GATES}")
        need(self.max_rejected_versions >= 0, "max_rejected_versions must be >= 0 (0: never stop)")
        # a gated version waits for devices to evaluate it: with none sampled, training would wait forever
        need(self.release_gate == "off" or self.candidate_eval_fraction > 0,
             "release_gate eval needs candidate_eval_fraction > 0")
        need(self.max_examples_per_update >= 1, "max_examples_per_update must be >= 1")
        need(self.tick_s > 0, "tick_s must be > 0")
        need(self.secure_aggregation in SECURE_AGGREGATION, f"secure_aggregation must be one of {SECURE_AGGREGATION}")
        if self.secure_aggregation != "none":
            need(self.aggregator == "mean", "secure aggregation releases only a sum: it needs aggregator mean")
            need(self.clip_norm > 0, "secure aggregation needs clip_norm > 0 (bounded updates)")
        need(0.5 < self.secagg_threshold <= 1.0, "secagg_threshold must be in (0.5, 1]")
        need(self.secagg_neighbors >= 0, "secagg_neighbors must be >= 0")
        need(self.secagg_bits in (32, 64), "secagg_bits must be 32 or 64")
        need(0 <= self.secagg_headroom_bits <= 24, "secagg_headroom_bits must be in [0, 24]")
        need(self.secagg_stage_s > 0, "secagg_stage_s must be > 0")
        need(self.secagg_min_participants >= 2, "secagg_min_participants must be >= 2")
        if self.secure_aggregation == "paillier":
            need(bool(self.paillier_keyholder_url), "paillier needs paillier_keyholder_url")
        need(8 <= self.paillier_value_bits <= 48, "paillier_value_bits must be in [8, 48]")
        need(0 < self.rr_p_first < 1 and 0 < self.rr_p_second < 1, "rr coin biases must be in (0, 1)")
        need(self.rr_period_s > 0, "rr_period_s must be > 0")
        need(not (self.open_registration and self.registration_key),
             "open_registration and registration_key exclude each other")
        need(self.registration_rate_per_s >= 0 and math.isfinite(self.registration_rate_per_s),
             "registration_rate_per_s must be >= 0 (0: no limit)")
        need(self.registration_burst >= 1, "registration_burst must be >= 1")
        need(self.max_devices >= 0, "max_devices must be >= 0 (0: no cap)")
        need(self.database is None or self.database.startswith(POSTGRES_SCHEMES),
             "database must be a postgresql:// URL (the default store is the SQLite file in data_dir; db_path moves it)")
        need(not (self.database and self.db_path), "database (PostgreSQL) and db_path (SQLite) exclude each other")
        need(not self.cluster or (self.database is not None and self.secure_aggregation == "none"),
             "cluster needs a PostgreSQL --database and no secure aggregation (its round state is one process's)")
        need((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together")
        need(not (self.tls_self_signed and self.tls_cert), "tls_self_signed and tls_cert exclude each other")
        for tls_file in (self.tls_cert, self.tls_key):
            need(tls_file is None or Path(tls_file).is_file(), f"TLS file {tls_file} does not exist")

    # ------------------------------------------------------------------ derived
    @property
    def fedavg(self) -> FedAvgHyperparams:
        """The FedAvg hyperparameters (models/fedavg.py) under their shared names."""
        return FedAvgHyperparams(
            client_lr=self.learning_rate, client_epochs=self.epochs, batch_size=self.batch_size,
            server_optimizer=self.server_optimizer, server_lr=self.server_lr, server_momentum=self.server_momentum,
            beta1=self.beta1, beta2=self.beta2, eps=self.eps,
        )

    @property
    def clip_count_stddev(self) -> float:
        """DP-FTRL adaptive clipping's count noise: as set, else TFF's default of 1/20 of the cohort."""
        return float(self.ftrl_clip_count_stddev if self.ftrl_clip_count_stddev is not None else self.round_goal / 20)

    @property
    def value_noise_multiplier(self) -> float:
        """The noise multiplier on the updates (TrainParams.value_noise_multiplier: less than z when adaptive
        clipping gives part of the budget to its count)."""
        if not (self.dp_mode == "ftrl" and self.ftrl_adaptive_clip) or self.noise_multiplier == 0:
            return float(self.noise_multiplier)
        return adaptive_value_noise_multiplier(float(self.noise_multiplier), self.clip_count_stddev)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.db_path) if self.db_path else self.data_path / "server.sqlite3"

    @property
    def db_target(self) -> str | Path:
        """What server.db.Db opens: the PostgreSQL URL if one is configured, else the SQLite file."""
        return self.database or self.sqlite_path

    @property
    def max_admitted(self) -> int:
        return math.ceil(self.round_goal * self.over_admit - 1e-9)

    @property
    def max_eval_admitted(self) -> int:
        return math.ceil(self.eval_goal * self.over_admit - 1e-9)

    def round_params(self, server_step: int = 1) -> dict[str, Any]:
        """The parameters frozen into a training round when it opens; its aggregate will be the server's step
        `server_step` (the devices' learning rate decays with it under client_lr_decay)."""
        # With a selection draw the cohort is the draw: no goal and no admission cap cut it first-come
        # (only selection_max_cohort, accounted for); see selection_q above.
        cohort = None if self.selection_q is None else self.selection_max_cohort or SELECTION_UNCAPPED
        return {
            "goal": self.round_goal if cohort is None else cohort,
            "min_count": self.min_count,
            "max_admitted": self.max_admitted if cohort is None else cohort,
            "deadline_s": self.deadline_s,
            **task_fields(self.fedavg),  # epochs, batch_size, learning_rate: the task's names for them
            **({"learning_rate": LrSchedule.from_fields(self).decay_at(server_step, self.learning_rate)}
               if self.client_lr_decay else {}),
            "dp_mode": self.dp_mode,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "aggregator": self.aggregator,
            "trim_fraction": self.trim_fraction,
            "norm_sigmas": self.norm_sigmas,
            "max_examples_per_update": self.max_examples_per_update,
            "upload_dtypes": list(self.upload_dtypes),
            "secure_aggregation": self.secure_aggregation,
            "secagg_threshold": self.secagg_threshold,
            "secagg_neighbors": self.secagg_neighbors,
            "secagg_bits": self.secagg_bits,
            "secagg_headroom_bits": self.secagg_headroom_bits,
            "secagg_stage_s": self.secagg_stage_s,
            "secagg_min_participants": self.secagg_min_participants,
            "paillier_value_bits": self.paillier_value_bits,
            **({"ftrl_rule": self.ftrl_rule, "ftrl_restart_rounds": self.ftrl_restart_rounds,
                "ftrl_min_separation": self.ftrl_min_separation, "ftrl_max_participations": self.ftrl_max_participations,
                "ftrl_efficient": self.ftrl_efficient} if self.dp_mode == "ftrl" else {}),
            **({"ftrl_adaptive_clip": True, "ftrl_target_quantile": self.ftrl_target_quantile,
                "ftrl_clip_lr": self.ftrl_clip_lr, "ftrl_clip_count_stddev": self.clip_count_stddev,
                "ftrl_initial_clip": self.clip_norm} if self.ftrl_adaptive_clip else {}),
            **({"selection_q": self.selection_q, "selection_max_cohort": self.selection_max_cohort}
               if self.selection_q is not None else {}),
        }

    @property
    def delta_default(self) -> float:
        """The delta every epsilon is reported at (dp_delta: 1e-6 unless set)."""
        return self.dp_delta

    def eval_params(self) -> dict[str, Any]:
        return {
            "goal": self.eval_goal,
            "min_count": self.eval_min_count,
            "max_admitted": self.max_eval_admitted,
            "deadline_s": self.eval_deadline_s,
            "promotion_tolerance": self.promotion_tolerance,
            "promotion_loss_tolerance": self.promotion_loss_tolerance,
        }

    def public_dict(self) -> dict[str, Any]:
        """Everything but secrets (for the admin API)."""
        data = dataclasses.asdict(self)
        data["admin_token"] = "***" if self.admin_token else None
        data["registration_key"] = "***" if self.registration_key else None
        data["paillier_keyholder_token"] = "***" if self.paillier_keyholder_token else None
        data["database"] = redact_url(self.database) if self.database else None
        data["rr_questions"] = list(self.rr_questions)
        data["upload_dtypes"] = list(self.upload_dtypes)
        return data

    # ------------------------------------------------------------------ loading
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServerConfig":
        data = canonical_keys(data)
        unknown = set(data) - cls.field_names()
        if unknown:
            raise ValueError(f"unknown server config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "ServerConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: server config must be a JSON object")
        data = canonical_keys(data)  # the flags below (field names) then override the file's aliases too
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def with_env(self) -> "ServerConfig":
        """Fill secrets from the environment where flags/files left them unset."""
        if self.admin_token is None and os.environ.get(ADMIN_TOKEN_ENV):
            self.admin_token = os.environ[ADMIN_TOKEN_ENV]
        if self.registration_key is None and os.environ.get(REGISTRATION_KEY_ENV):
            self.registration_key = os.environ[REGISTRATION_KEY_ENV]
        if self.paillier_keyholder_token is None and os.environ.get(KEYHOLDER_TOKEN_ENV):
            self.paillier_keyholder_token = os.environ[KEYHOLDER_TOKEN_ENV]
        self.registration_key = self.resolve_registration_key()
        return self

    def resolve_registration_key(self) -> str | None:
        """The key devices must present to register: the configured one, else the one in
        <data_dir>/registration_key (generated, 0600, on first use); None only with open_registration."""
        if self.open_registration:
            return None
        if self.registration_key:
            return self.registration_key
        return ensure_secret_file(self.data_path / REGISTRATION_KEY_FILE)
