"""SimConfig: every knob of a simulation run, from defaults < config file (JSON/TOML) < flags.

    python -m tff_sim --preset small --rounds 30 --dp --target-epsilon 10
    python -m tff_sim --config run.toml --rounds 5      # the flag wins over the file

A config file holds the same names as SimConfig's fields (dashes or underscores), e.g.
run.json {"preset": "gboard", "rounds": 300} or run.toml `preset = "gboard"`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Sequence

from models.config import check_dropout
from models.dp_noise_check import DEFAULT_MAX_NOISE_TO_CLIP
from models.iterate_average import check_decay
from models.fedavg import SERVER_OPTIMIZERS, FedAvgHyperparams
from models.lr_schedule import DEFAULT_GAMMA, DEFAULT_MIN_LR_FRACTION, SCHEDULES, LrSchedule

SAMPLING = ("auto", "uniform", "poisson", "shuffled", "cyclic")
DP_MECHANISMS = ("dp-fedavg", "dp-ftrl")
FTRL_RESTARTS = ("epoch", "none")
ACCOUNTANTS = ("rdp", "pld")
DP_NOISE = ("seeded", "tff")
TFF_LOOPS = ("iterator", "reduce")

# Fields that change where a run goes or how it is watched, not what it computes: they are
# left out of the run's identity (config_hash), so a resumed run may change them.
_NON_IDENTITY = {
    "output", "fresh", "push", "admin_token", "push_path", "tensorboard", "progress", "checkpoint_every",
    "plots", "baselines", "final_eval_max_sentences", "accountants", "max_noise_to_clip", "allow_noisy_dp",
    "workers",
}
# Fields added after runs were made: left out of the identity while at these (their old, built-in)
# values, so an existing run keeps its config hash and can still be resumed.
_ADDED_LATER = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-3, "dp_mechanism": "dp-fedavg", "ftrl_restart": "epoch",
                "ftrl_efficient": True, "population": "all", "vocab_source": None, "init_bundle": None,
                "server_lr_schedule": "constant", "server_lr_warmup_rounds": 0,
                "server_lr_min_fraction": DEFAULT_MIN_LR_FRACTION, "server_lr_total_rounds": None,
                "server_lr_step_rounds": None, "server_lr_gamma": DEFAULT_GAMMA, "client_lr_decay": False,
                "dropout": 0.0, "average_decay": 0.0}
POPULATIONS = ("all", "donors", "federated")  # = models.data.POPULATIONS (docs/donors.md)
VOCAB_SOURCES = ("all", "donors", "wordfreq")  # = models.data.VOCAB_SOURCES


@dataclasses.dataclass
class SimConfig:
    # data
    dataset: str = "chitchat"  # chitchat | shakespeare | a .txt file | a folder of .txt files
    data_seed: int = 0  # the dataset's split seed (the baselines use 0: keep it for comparable figures)
    max_train_clients: int | None = None  # train on a seeded subset of the training clients (None: all)
    max_examples_per_client: int = 64  # cap per client per round (Gboard caps examples per device too)
    population: str = "all"  # all training clients | federated (not the donors) | donors (docs/donors.md)
    vocab_source: str | None = None  # all | donors | wordfreq; None: all for population all, else donors
    init_bundle: str | None = None  # start from this model bundle (its vocabulary and weights), e.g. a donor-trained one
    # model
    preset: str = "gboard"  # gboard (Hard et al. 2018, the baselines' preset) | small | tiny
    vocab_size: int | None = None  # words + 4 specials; None: the preset's
    dropout: float = 0.0  # clients train with this dropout on the LSTM's inputs and outputs (no weights: same bundle)
    # federated training
    rounds: int = 50
    clients_per_round: int = 10
    client_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 0.5
    client_momentum: float = 0.0
    client_lr_decay: bool = False  # the client lr decays with the server lr schedule, without its warmup
    average_decay: float = 0.0  # serve (evaluate, export) the EMA of the rounds' global models at this decay (0: off)
    # server optimizer (models/fedavg.py defines each): sgd | momentum | nesterov (Gboard: Nesterov 0.9) |
    # adam (FedAdam) | yogi (FedYogi) | adagrad (FedAdagrad)
    server_optimizer: str = "nesterov"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # momentum / nesterov
    beta1: float = 0.9  # adam / yogi
    beta2: float = 0.99  # adam / yogi
    eps: float = 1e-3  # adam / yogi / adagrad (Reddi et al.'s tau)
    # server learning-rate schedule (models/lr_schedule.py): the lr of round r is a function of r, set
    # before each round, so a resumed run recomputes it
    server_lr_schedule: str = "constant"  # constant | cosine | step | inverse_sqrt
    server_lr_warmup_rounds: int = 0  # linear warmup from server_lr / W to server_lr over the first W rounds
    server_lr_min_fraction: float = DEFAULT_MIN_LR_FRACTION  # cosine: the floor, as a fraction of server_lr
    server_lr_total_rounds: int | None = None  # cosine: the rounds it decays over (warmup included); None: rounds
    server_lr_step_rounds: int | None = None  # step: multiply by server_lr_gamma every N rounds
    server_lr_gamma: float = DEFAULT_GAMMA  # step
    sampling: str = "auto"  # uniform: m clients without replacement; poisson: each with prob m/N; auto: poisson iff DP
    seed: int = 0
    tff_loop: str = "iterator"  # iterator (fast) | reduce (TFF's default): how clients loop over batches
    workers: str | None = None  # "HOST:PORT[,HOST:PORT...]": run the clients on TFF workers (tff_sim/workers.py)
    # differential privacy (DP-FedAvg, unweighted mean of clipped updates + Gaussian noise)
    dp: bool = False
    noise_multiplier: float | None = None  # None with --dp: calibrated from target_epsilon, else 1.0
    target_epsilon: float | None = None  # calibrate the noise multiplier for this epsilon after `rounds`
    delta: float | None = None  # None: 1e-6 (models.dp.DEFAULT_DELTA)
    clip: float = 1.0  # fixed L2 clip of each client's update (initial clip when adaptive)
    adaptive_clip: bool = False  # quantile-based adaptive clipping (Andrew et al. 2019)
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    accountants: tuple[str, ...] = ("rdp", "pld")
    dp_noise: str = "seeded"  # seeded: stateless noise seeded from the run seed (exact resume); tff: TFF's stock factory
    # DP-FTRL (Kairouz et al. 2021): tree-aggregated noise, no sampling; clients in a seeded shuffled order
    dp_mechanism: str = "dp-fedavg"  # dp-fedavg (Poisson-sampled Gaussian) | dp-ftrl (tree aggregation)
    ftrl_restart: str = "epoch"  # epoch: reshuffle and restart the tree every epoch | none: one order cycled, one tree
    ftrl_efficient: bool = True  # Honaker's efficient tree (TFF's default) or the plain binary tree
    # DP noise check (models/dp_noise_check.py): python -m tff_sim refuses a --dp run whose round noise on the mean
    # (expected L2 norm) exceeds max_noise_to_clip x the clip, unless allow_noisy_dp (then it warns)
    max_noise_to_clip: float = DEFAULT_MAX_NOISE_TO_CLIP
    allow_noisy_dp: bool = False
    # evaluation and output
    eval_every: int = 10  # federated evaluation on held-out clients every N rounds (0: only at the end)
    eval_clients: int = 20  # held-out clients in the periodic federated evaluation (0: all)
    eval_max_examples_per_client: int = 128
    final_eval_max_sentences: int | None = 5_000  # cap per split of the final evaluation (= models.baselines' default)
    output: str | None = None  # run folder; None: runs/tff/<dataset>-<preset>-<config hash>
    checkpoint_every: int = 10
    fresh: bool = False  # ignore an existing checkpoint in the output folder
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    baselines: str | None = "artifacts/baselines/results.json"  # reference rows (n-gram, server-trained)
    push: str | None = None  # server URL to hand the final model to as a candidate
    admin_token: str | None = None
    push_path: str = "/v1/admin/models"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks and derived values

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")

        for name in ("rounds", "clients_per_round", "max_examples_per_client", "eval_max_examples_per_client"):
            positive(name)
        self.fedavg  # noqa: B018 - builds (so validates) the FedAvg hyperparameters
        self.lr_schedule  # noqa: B018 - builds (so validates) the server lr schedule
        if self.population not in POPULATIONS:
            raise ValueError(f"population must be one of {POPULATIONS}, got {self.population!r}")
        if self.vocab_source is not None and self.vocab_source not in VOCAB_SOURCES:
            raise ValueError(f"vocab_source must be one of {VOCAB_SOURCES}, got {self.vocab_source!r}")
        if self.init_bundle is not None and (self.vocab_source is not None or self.vocab_size is not None):
            raise ValueError("init_bundle brings its own vocabulary: drop vocab_source / vocab_size")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.tff_loop not in TFF_LOOPS:
            raise ValueError(f"tff_loop must be one of {TFF_LOOPS}, got {self.tff_loop!r}")
        if self.workers is not None:  # a string, or a list from a config file: normalized to "h:p,h:p"
            from tff_sim.workers import parse_workers

            self.workers = ",".join(parse_workers(self.workers))
        if self.dp_noise not in DP_NOISE:
            raise ValueError(f"dp_noise must be one of {DP_NOISE}, got {self.dp_noise!r}")
        self.accountants = tuple(self.accountants)
        bad = [a for a in self.accountants if a not in ACCOUNTANTS]
        if bad or not self.accountants:
            raise ValueError(f"accountants must be a non-empty subset of {ACCOUNTANTS}, got {self.accountants!r}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("target_epsilon must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if (self.noise_multiplier is not None or self.target_epsilon is not None or self.adaptive_clip) and not self.dp:
            raise ValueError("noise_multiplier, target_epsilon and adaptive_clip need --dp")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give either noise_multiplier or target_epsilon, not both")
        if self.clip <= 0:
            raise ValueError("clip must be > 0")
        if not self.max_noise_to_clip > 0:
            raise ValueError("max_noise_to_clip must be > 0")
        if not 0 < self.target_quantile < 1:
            raise ValueError("target_quantile must be in (0, 1)")
        if self.eval_every < 0 or self.eval_clients < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every, eval_clients and checkpoint_every must be >= 0")
        if self.dp_mechanism not in DP_MECHANISMS:
            raise ValueError(f"dp_mechanism must be one of {DP_MECHANISMS}, got {self.dp_mechanism!r}")
        if self.ftrl_restart not in FTRL_RESTARTS:
            raise ValueError(f"ftrl_restart must be one of {FTRL_RESTARTS}, got {self.ftrl_restart!r}")
        check_dropout(self.dropout)
        check_decay(self.average_decay)
        if self.client_lr_decay and self.lr_schedule.name == "constant":
            raise ValueError("--client-lr-decay follows the server lr schedule's decay: set --server-lr-schedule "
                             "(cosine, step or inverse_sqrt)")
        if self.dp_mechanism == "dp-ftrl":
            if not self.dp:
                raise ValueError("--dp-mechanism dp-ftrl needs --dp")
            if self.server_optimizer not in ("sgd", "momentum"):
                raise ValueError("DP-FTRL's server step is SGD over the tree residuals (FTRL) or heavy-ball momentum "
                                 "(DP-FTRLM): use --server-optimizer sgd or momentum")
            if not self.lr_schedule.is_constant:
                # w_t = w_0 - lr * (noised cumulative sum) needs one lr: the residuals' tree noise telescopes
                # only then. A varying lr keeps the privacy (post-processing) but not FTRL's noise.
                raise ValueError("DP-FTRL needs a constant server learning rate (its tree noise cancels across "
                                 "rounds only with one lr): drop --server-lr-schedule / --server-lr-warmup-rounds")
            if self.sampling not in ("auto", self.ftrl_sampling):
                raise ValueError(f"DP-FTRL's accounting assumes its own participation rule: use --sampling auto "
                                 f"(= {self.ftrl_sampling} for --ftrl-restart {self.ftrl_restart})")
        elif self.sampling in ("shuffled", "cyclic"):
            raise ValueError(f"--sampling {self.sampling} is DP-FTRL's participation rule (--dp --dp-mechanism dp-ftrl)")
        if self.push and not self.admin_token:
            raise ValueError("--push needs --admin-token")

    @property
    def fedavg(self) -> FedAvgHyperparams:
        """The FedAvg hyperparameters of this run (models/fedavg.py, shared with the server and devices)."""
        return FedAvgHyperparams(
            client_lr=self.client_lr, client_epochs=self.client_epochs, batch_size=self.batch_size,
            server_optimizer=self.server_optimizer, server_lr=self.server_lr, server_momentum=self.server_momentum,
            beta1=self.beta1, beta2=self.beta2, eps=self.eps,
        )

    @property
    def lr_schedule(self) -> LrSchedule:
        """The server learning-rate schedule (models/lr_schedule.py); cosine decays over `rounds` unless
        server_lr_total_rounds says otherwise."""
        return LrSchedule.from_fields(self, self.rounds if self.server_lr_schedule == "cosine" else None)

    def server_lr_at(self, round_num: int) -> float:
        """The server learning rate of round `round_num` (1-based)."""
        return self.lr_schedule.lr_at(round_num, self.server_lr)

    def client_lr_at(self, round_num: int) -> float:
        """The client learning rate of round `round_num`: client_lr, decayed with the server's schedule
        when client_lr_decay."""
        return self.lr_schedule.decay_at(round_num, self.client_lr) if self.client_lr_decay else self.client_lr

    @property
    def ftrl_sampling(self) -> str:
        """DP-FTRL's participation rule: shuffled (once per epoch, tree restarted) or cyclic (min separation)."""
        return "shuffled" if self.ftrl_restart == "epoch" else "cyclic"

    @property
    def sampling_mode(self) -> str:
        if self.sampling != "auto":
            return self.sampling
        if self.dp and self.dp_mechanism == "dp-ftrl":
            return self.ftrl_sampling
        return "poisson" if self.dp else "uniform"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["accountants"] = list(self.accountants)
        return data

    def public_dict(self) -> dict[str, Any]:
        """to_dict() without secrets (for reports and logs)."""
        data = self.to_dict()
        if data.get("admin_token"):
            data["admin_token"] = "***"
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that determine the computation (what a checkpoint must agree with).

        `rounds` is left out unless the noise is calibrated for it or a cosine schedule decays over
        it: rounds r depend only on (seed, r), so a finished run can be extended, and an interrupted
        one resumed, with a different --rounds.
        """
        rounds_matter = self.target_epsilon is not None or (
            self.server_lr_schedule == "cosine" and self.server_lr_total_rounds is None)
        skip = set(_NON_IDENTITY) | (set() if rounds_matter else {"rounds"})
        skip |= {k for k, v in _ADDED_LATER.items() if getattr(self, k) == v}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def config_hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        name = Path(self.dataset).name if self.dataset not in ("chitchat", "shakespeare") else self.dataset
        return Path("runs") / "tff" / f"{name}-{self.preset}-{self.config_hash()}"

    def replace(self, **changes: Any) -> "SimConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SimConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        normalized = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalized) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        if "accountants" in normalized and isinstance(normalized["accountants"], str):
            normalized["accountants"] = tuple(a.strip() for a in normalized["accountants"].split(","))
        return cls(**normalized)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (.json) or TOML (.toml) file of SimConfig fields (a [tff_sim] table in TOML also works)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        data = tomllib.loads(text)
        data = data.get("tff_sim", data)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold an object of SimConfig fields")
    return data


def _bool_flag(parser: argparse.ArgumentParser, name: str, help_: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=argparse.SUPPRESS, help=help_)


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig.__dataclass_fields__  # defaults shown in --help

    def default(name: str) -> Any:
        return d[name].default

    p = argparse.ArgumentParser(
        prog="python -m tff_sim",
        description="Gboard-style federated training of the next-word model in TensorFlow Federated "
        "(FedAvg / DP-FedAvg), with evaluation, privacy accounting and a report.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="JSON or TOML file of settings (flags override it)", default=None)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"chitchat, shakespeare, a .txt file or a folder of them (default {default('dataset')})")
    g.add_argument("--data-seed", type=int, help=f"dataset split seed (default {default('data_seed')})")
    g.add_argument("--max-train-clients", type=int, help="train on a seeded subset of this many clients (default all)")
    g.add_argument("--max-examples-per-client", type=int,
                   help=f"examples per client per round (default {default('max_examples_per_client')})")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=("tiny", "small", "gboard"), help=f"model size (default {default('preset')})")
    g.add_argument("--vocab-size", type=int, help="vocabulary incl. 4 special tokens (default: the preset's)")
    g.add_argument("--dropout", type=float, help="dropout rate on the LSTM's inputs and outputs in the clients' "
                   f"training (models/keras_model.py; default {default('dropout')})")
    g.add_argument("--population", choices=POPULATIONS,
                   help="train on all training clients, only the federated ones (not the donors) or only the "
                   "donors; held-out evaluation is unchanged (docs/donors.md; default all)")
    g.add_argument("--vocab-source", choices=VOCAB_SOURCES,
                   help="vocabulary from all training clients' text, the donors' text or public word frequencies "
                   "(wordfreq); default: all for --population all, else donors")
    g.add_argument("--init-bundle", help="start from this model bundle's weights and vocabulary (e.g. "
                   "models.baselines --population donors' <out>/server_trained); its preset must be --preset")
    g = p.add_argument_group("federated training")
    g.add_argument("--rounds", type=int, help=f"default {default('rounds')}")
    g.add_argument("--clients-per-round", type=int, help=f"default {default('clients_per_round')}")
    g.add_argument("--client-epochs", type=int, help=f"default {default('client_epochs')}")
    g.add_argument("--batch-size", type=int, help=f"default {default('batch_size')}")
    g.add_argument("--client-lr", type=float, help=f"client SGD learning rate (default {default('client_lr')})")
    _bool_flag(g, "client-lr-decay", "decay the client lr with the server lr schedule, without its warmup "
               "(models/lr_schedule.py: LrSchedule.decay_at)")
    g.add_argument("--average-decay", type=float,
                   help="evaluate, export and push the exponential moving average of the rounds' global models "
                   "(bias-corrected, models/iterate_average.py), training going on from the rounds' own; "
                   f"0: the last round's model (default {default('average_decay')})")
    g.add_argument("--client-momentum", type=float, help=f"client SGD momentum (default {default('client_momentum')})")
    g.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS,
                   help="nesterov = Gboard's SGD with Nesterov momentum; adam/yogi/adagrad = FedAdam/FedYogi/FedAdagrad "
                   f"(models/fedavg.py; default {default('server_optimizer')})")
    g.add_argument("--server-lr", type=float, help=f"default {default('server_lr')}")
    g.add_argument("--server-momentum", type=float, help=f"for momentum/nesterov (default {default('server_momentum')})")
    g.add_argument("--beta1", type=float, help=f"adam/yogi first-moment decay (default {default('beta1')})")
    g.add_argument("--beta2", type=float, help=f"adam/yogi second-moment decay (default {default('beta2')})")
    g.add_argument("--eps", type=float, help=f"adam/yogi/adagrad epsilon, Reddi et al.'s tau (default {default('eps')})")
    g.add_argument("--server-lr-schedule", choices=SCHEDULES,
                   help="server learning rate per round (models/lr_schedule.py): constant; cosine down to "
                   "--server-lr-min-fraction x --server-lr over --server-lr-total-rounds; step (x --server-lr-gamma "
                   f"every --server-lr-step-rounds); inverse_sqrt (default {default('server_lr_schedule')})")
    g.add_argument("--server-lr-warmup-rounds", type=int,
                   help="linear warmup from server_lr / W to server_lr over the first W rounds, any schedule "
                   f"(default {default('server_lr_warmup_rounds')})")
    g.add_argument("--server-lr-min-fraction", type=float,
                   help=f"cosine: the floor as a fraction of --server-lr (default {default('server_lr_min_fraction')})")
    g.add_argument("--server-lr-total-rounds", type=int,
                   help="cosine: the rounds it decays over, warmup included; later rounds stay at the floor "
                   "(default: --rounds)")
    g.add_argument("--server-lr-step-rounds", type=int, help="step: multiply the lr by --server-lr-gamma every N rounds")
    g.add_argument("--server-lr-gamma", type=float, help=f"step: the factor (default {default('server_lr_gamma')})")
    g.add_argument("--sampling", choices=SAMPLING,
                   help="client sampling per round; auto = poisson with DP-FedAvg (what the accountant assumes), "
                   "shuffled/cyclic with DP-FTRL, else uniform")
    g.add_argument("--seed", type=int, help=f"model init, client sampling, batch order, DP noise (default {default('seed')})")
    g.add_argument("--tff-loop", choices=TFF_LOOPS,
                   help="client loop over batches: iterator (DATASET_ITERATOR, fast) or reduce (TFF's default "
                   "DATASET_REDUCE, ~5x slower per batch here)")
    g.add_argument("--workers", metavar="HOST:PORT[,HOST:PORT...]",
                   help="run the clients on these TFF workers (python -m tff_sim.worker --port P on each), the "
                   "cohort split evenly between them; the same model as a local run (default: local)")
    g = p.add_argument_group("differential privacy")
    _bool_flag(g, "dp", "DP-FedAvg: clip each client's update, average unweighted, add Gaussian noise")
    g.add_argument("--noise-multiplier", type=float, help="noise stddev / clip (default 1.0 unless --target-epsilon)")
    g.add_argument("--target-epsilon", type=float, help="calibrate the noise multiplier to reach this epsilon after --rounds")
    g.add_argument("--delta", type=float, help="delta of the reported epsilon (default 1e-6)")
    g.add_argument("--clip", type=float, help=f"L2 clip of client updates (initial clip if adaptive; default {default('clip')})")
    _bool_flag(g, "adaptive-clip", "adapt the clip to a quantile of update norms (Andrew et al. 2019)")
    g.add_argument("--target-quantile", type=float, help=f"default {default('target_quantile')}")
    g.add_argument("--clip-lr", type=float, help=f"adaptive clip learning rate (default {default('clip_lr')})")
    g.add_argument("--accountants", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="comma-separated: rdp,pld (default both)")
    g.add_argument("--dp-noise", choices=DP_NOISE,
                   help="seeded: the same Gaussian mechanism with noise from a stateless seeded generator kept "
                   "in the aggregator state (bit-exact resume); tff: TFF's stock gaussian_fixed/gaussian_adaptive")
    g.add_argument("--dp-mechanism", choices=DP_MECHANISMS,
                   help="dp-fedavg: Poisson-sampled Gaussian (accounting assumes sampling); dp-ftrl: tree-aggregated "
                   "noise (Kairouz et al. 2021), each client at most once per epoch, no sampling needed "
                   f"(default {default('dp_mechanism')})")
    g.add_argument("--ftrl-restart", choices=FTRL_RESTARTS,
                   help="dp-ftrl: epoch = a fresh shuffled client order and a new tree every epoch; none = one "
                   f"shuffled order cycled, one tree, accounted by min separation (default {default('ftrl_restart')})")
    _bool_flag(g, "ftrl-efficient", "dp-ftrl: Honaker's efficient tree estimator (TFF's default; --no-ftrl-efficient: plain tree)")
    g.add_argument("--max-noise-to-clip", type=float,
                   help="refuse a --dp run whose round noise (expected L2 norm on the mean) exceeds this many clips "
                   f"(models/dp_noise_check.py; default {default('max_noise_to_clip')})")
    _bool_flag(g, "allow-noisy-dp", "run a --dp run even when its noise would swamp the model (warns)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, help=f"federated eval every N rounds (default {default('eval_every')})")
    g.add_argument("--eval-clients", type=int, help=f"held-out clients per periodic eval, 0 = all (default {default('eval_clients')})")
    g.add_argument("--eval-max-examples-per-client", type=int, help=f"default {default('eval_max_examples_per_client')}")
    g.add_argument("--final-eval-max-sentences", type=int,
                   help=f"cap per split of the final evaluation, 0 = all (default {default('final_eval_max_sentences')})")
    g.add_argument("--output", "--out", dest="output", help="run folder (default runs/tff/<dataset>-<preset>-<hash>)")
    g.add_argument("--checkpoint-every", type=int, help=f"rounds between checkpoints (default {default('checkpoint_every')})")
    _bool_flag(g, "fresh", "start over even if the run folder holds a checkpoint")
    _bool_flag(g, "tensorboard", "write TensorBoard logs")
    _bool_flag(g, "plots", "write PNG plots")
    _bool_flag(g, "progress", "show a progress bar")
    g.add_argument("--baselines", help="results.json of models.baselines for reference rows ('' = none)")
    g = p.add_argument_group("hand-off to the server")
    g.add_argument("--push", help="server URL: push the final model as a candidate global model")
    g.add_argument("--admin-token", help="the server's admin token (or $FK_ADMIN_TOKEN)")
    g.add_argument("--push-path", help=f"admin endpoint (default {default('push_path')})")
    return p


def parse_args(argv: Sequence[str] | None = None) -> SimConfig:
    """defaults < --config file < flags given on the command line."""
    import os

    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    data: dict[str, Any] = load_config_file(config_path) if config_path else {}
    data.update(args)
    if data.get("push") and not data.get("admin_token") and os.environ.get("FK_ADMIN_TOKEN"):
        data["admin_token"] = os.environ["FK_ADMIN_TOKEN"]
    if data.get("final_eval_max_sentences") == 0:
        data["final_eval_max_sentences"] = None
    if data.get("baselines") == "":
        data["baselines"] = None
    return SimConfig.from_dict(data)


def dp_noise_report(cfg: SimConfig, dim: int | None = None, noise_multiplier: float | None = None):
    """The DP noise check of a --dp run (models/dp_noise_check.py), or None (no --dp, or a noise multiplier that
    is only calibrated from --target-epsilon once the population is known: pass it as `noise_multiplier`).

    dim: the model's weights (default: the preset at --vocab-size, an upper bound when the data's vocabulary is
    smaller). TFF's DP mean adds N(0, (zC)^2) to the sum and divides by clients_per_round ("central"); DP-FTRL's
    tree is taken to span --rounds leaves (an epoch's tree has at most that many).
    """
    from models import dp_noise_check
    from models.config import preset

    if not cfg.dp:
        return None
    z = noise_multiplier if noise_multiplier is not None else cfg.noise_multiplier
    if z is None:
        if cfg.target_epsilon is not None:
            return None
        z = 1.0  # privacy.plan's default
    dim = dim or preset(cfg.preset, cfg.vocab_size).num_parameters()
    ftrl = cfg.dp_mechanism == "dp-ftrl"
    return dp_noise_check.check(
        "ftrl" if ftrl else "central", z, cfg.clip, cfg.clients_per_round, dim,
        server_lr=cfg.server_lr if cfg.server_optimizer in ("sgd", "momentum", "nesterov") else None,
        max_noise_to_clip=cfg.max_noise_to_clip, ftrl_rounds=cfg.rounds if ftrl else None,
        ftrl_efficient=cfg.ftrl_efficient, knobs=dp_noise_check.SIM_KNOBS)


def dp_noise_refusal(cfg: SimConfig, dim: int | None = None, noise_multiplier: float | None = None) -> str | None:
    """None: run (a too-noisy run with allow_noisy_dp is logged as a warning); else the refusal message."""
    import logging

    report = dp_noise_report(cfg, dim, noise_multiplier)
    if report is None:
        return None
    if report.ok:
        logging.getLogger("tff_sim").info("%s", report.message)
        return None
    if cfg.allow_noisy_dp:
        logging.getLogger("tff_sim").warning("%s -- running anyway (--allow-noisy-dp)", report.message)
        return None
    return report.message
