"""The TFF learning and evaluation processes, built from the models/ Keras model.

    FedAvg (no DP):  tff.learning.algorithms.build_weighted_fed_avg   (clients weighted by examples)
    DP-FedAvg:       tff.learning.algorithms.build_unweighted_fed_avg (DP mean of clipped updates)
    DP-FTRL:         the same, with the tree-aggregation DP mean (dp_aggregators.ftrl_factory) and
                     server SGD (momentum = DP-FTRLM; see models/dp_ftrl.py)
    evaluation:      tff.learning.algorithms.build_fed_eval           (sums of models/ keras metrics)

The server learning rate of a round (models/lr_schedule.py) goes into the state before the round through
the process's get_hparams / set_hparams (`set_server_lr`): every server optimizer here (TFF's sgdm, adam,
yogi, adagrad and tff_sim/nesterov.py) keeps it in its state under LEARNING_RATE_KEY. A decaying client
lr (--client-lr-decay) goes the same way into the client work's hyperparameters (`set_client_lr`).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from models.config import ModelConfig
from models.fedavg import ADAGRAD_INITIAL_PRECONDITIONER, YOGI_INITIAL_PRECONDITIONER, FedAvgHyperparams
from models.keras_metrics import MaskedMeanCrossEntropy, MaskedTokenCount, MaskedTopKRecall
from models.keras_model import build_model, get_weights, masked_loss
from tff_sim.config import SimConfig
from tff_sim.dp_aggregators import dp_factory, ftrl_factory
from tff_sim.nesterov import build_nesterov


def input_spec(config: ModelConfig) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    spec = tf.TensorSpec([None, config.seq_len], tf.int32)
    return (spec, spec)


def train_metrics() -> list[Callable[[], tf.keras.metrics.Metric]]:
    """Training reports TFF's own `loss` (the example-weighted mean of batch losses) and the token count.

    A token-weighted loss metric would compute the softmax cross-entropy over the whole
    vocabulary a second time per batch: measured +14% per batch on the gboard preset.
    Recall (a top-k over the vocabulary) is left to evaluation too.
    """
    return [lambda: MaskedTokenCount(name="num_tokens")]


def eval_metrics() -> list[Callable[[], tf.keras.metrics.Metric]]:
    return [
        lambda: MaskedTopKRecall(1, name="top1_recall"),
        lambda: MaskedTopKRecall(3, name="top3_recall"),
        lambda: MaskedMeanCrossEntropy(name="token_loss"),
        lambda: MaskedTokenCount(name="num_tokens"),
    ]


def make_model_fn(config: ModelConfig, metrics: Callable[[], list] = train_metrics,
                  dropout: float = 0.0) -> Callable[[], Any]:
    """A no-argument model_fn: TFF calls it inside its own graphs, so it builds a fresh model each time.
    `dropout` acts in the clients' training only (TFF's forward pass with training=True)."""

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_model(config, dropout=dropout),
            loss=masked_loss(),
            input_spec=input_spec(config),
            metrics=[m() for m in metrics()],
        )

    return model_fn


def initial_weights(config: ModelConfig, seed: int) -> list[np.ndarray]:
    """The seeded starting point shared by TFF and the plain-Keras loops."""
    return get_weights(build_model(config, seed=seed))


def client_optimizer(cfg: SimConfig) -> tff.learning.optimizers.Optimizer:
    return tff.learning.optimizers.build_sgdm(cfg.client_lr, momentum=cfg.client_momentum or None)


def tff_server_optimizer(hp: FedAvgHyperparams) -> tff.learning.optimizers.Optimizer:
    """TFF's optimizer for hp.server_optimizer, with the hyperparameters (and starting preconditioners)
    of models/fedavg.py's numpy reference: tests/test_fedavg.py checks the two agree step for step."""
    opts, name, lr = tff.learning.optimizers, hp.server_optimizer, hp.server_lr
    if name == "sgd":
        return opts.build_sgdm(lr)
    if name == "momentum":
        return opts.build_sgdm(lr, momentum=hp.server_momentum)
    if name == "nesterov":
        return build_nesterov(lr, momentum=hp.server_momentum)
    if name == "adam":
        return opts.build_adam(lr, beta_1=hp.beta1, beta_2=hp.beta2, epsilon=hp.eps)
    if name == "yogi":
        return opts.build_yogi(lr, beta_1=hp.beta1, beta_2=hp.beta2, epsilon=hp.eps,
                               initial_preconditioner_value=YOGI_INITIAL_PRECONDITIONER)
    if name == "adagrad":
        return opts.build_adagrad(lr, initial_preconditioner_value=ADAGRAD_INITIAL_PRECONDITIONER, epsilon=hp.eps)
    raise ValueError(f"unknown server optimizer {name!r}")


def server_optimizer(cfg: SimConfig) -> tff.learning.optimizers.Optimizer:
    return tff_server_optimizer(cfg.fedavg)


def loop_implementation(name: str) -> tff.learning.LoopImplementation:
    """How a client iterates over its batches inside TFF.

    "iterator" (DATASET_ITERATOR, our default) runs the training step in an ordinary
    tf.function while-loop over the dataset iterator. "reduce" (DATASET_REDUCE, TFF's
    default) runs it inside tf.data's ReduceDataset op, whose nested function runs without
    the graph optimizations of a top-level function: measured here 5-6x slower per batch
    for the tiny preset (benchmarks/bench_tff_round_time.py).
    """
    loops = {"iterator": tff.learning.LoopImplementation.DATASET_ITERATOR,
             "reduce": tff.learning.LoopImplementation.DATASET_REDUCE}
    if name not in loops:
        raise ValueError(f"tff loop must be one of {sorted(loops)}, got {name!r}")
    return loops[name]


def trainable_specs(model_config: ModelConfig) -> list[tf.TensorSpec]:
    """Specs of the model update (the trainable weights), which TFF's tree noise needs up front."""
    model = make_model_fn(model_config)()
    return [tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_variables]


FTRL_SERVER_OPTIMIZERS = ("sgd", "momentum")


def ftrl_server_optimizer(cfg: SimConfig) -> tff.learning.optimizers.Optimizer:
    """DP-FTRL's server step: SGD over the tree residuals is FTRL; heavy-ball momentum makes it DP-FTRLM
    (Kairouz et al. 2021 Sec. 4). Adaptive optimizers and Nesterov are not FTRL, so they are refused."""
    if cfg.server_optimizer not in FTRL_SERVER_OPTIMIZERS:
        raise ValueError(f"DP-FTRL needs --server-optimizer sgd or momentum (FTRL / FTRL with momentum), "
                         f"got {cfg.server_optimizer!r}")
    return tff_server_optimizer(cfg.fedavg)


def build_learning_process(
    cfg: SimConfig, model_config: ModelConfig, noise_multiplier: float | None = None,
    restart_period: int | None = None,
) -> tff.learning.templates.LearningProcess:
    """FedAvg without DP; DP-FedAvg (unweighted, clipped, noised) with cfg.dp; DP-FTRL with
    cfg.dp_mechanism "dp-ftrl" (tree restarted after every `restart_period` rounds, None: never)."""
    model_fn = make_model_fn(model_config, dropout=cfg.dropout)
    loop = loop_implementation(cfg.tff_loop)
    if not cfg.dp:
        return tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=client_optimizer(cfg),
            server_optimizer_fn=server_optimizer(cfg),
            client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
            loop_implementation=loop,
        )
    if noise_multiplier is None:
        raise ValueError("a DP process needs its noise multiplier")
    if cfg.dp_mechanism == "dp-ftrl":
        if (cfg.ftrl_restart == "epoch") != (restart_period is not None):
            raise ValueError("DP-FTRL restarts its tree every epoch (restart_period = rounds per epoch) exactly "
                             "when --ftrl-restart epoch: the accountant assumes that")
        return tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn,
            client_optimizer_fn=client_optimizer(cfg),
            server_optimizer_fn=ftrl_server_optimizer(cfg),
            model_aggregator=ftrl_factory(
                noise_multiplier, cfg.clients_per_round, cfg.clip, trainable_specs(model_config),
                restart_period=restart_period, adaptive=cfg.adaptive_clip, target_quantile=cfg.target_quantile,
                clip_lr=cfg.clip_lr, noise=cfg.dp_noise, seed=cfg.seed, efficient=cfg.ftrl_efficient,
            ),
            loop_implementation=loop,
        )
    aggregator = dp_factory(
        noise_multiplier, cfg.clients_per_round, cfg.clip, adaptive=cfg.adaptive_clip,
        target_quantile=cfg.target_quantile, clip_lr=cfg.clip_lr, noise=cfg.dp_noise, seed=cfg.seed,
    )
    return tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn,
        client_optimizer_fn=client_optimizer(cfg),
        server_optimizer_fn=server_optimizer(cfg),
        model_aggregator=aggregator,
        loop_implementation=loop,
    )


def server_lr(process: tff.learning.templates.LearningProcess, state) -> float:
    """The server optimizer's learning rate in `state` (the finalizer's hyperparameters)."""
    hparams = process.get_hparams(state)
    return float(np.asarray(_optimizer_hparams(hparams, "finalizer")[tff.learning.optimizers.LEARNING_RATE_KEY]))


def set_server_lr(process: tff.learning.templates.LearningProcess, state, lr: float):
    """`state` with the server optimizer's learning rate set to `lr`, everything else unchanged."""
    return _set_lr(process, state, "finalizer", lr)


def set_client_lr(process: tff.learning.templates.LearningProcess, state, lr: float):
    """`state` with the clients' optimizer learning rate set to `lr` (the client work's hyperparameters,
    which TFF hands every client of the next round), everything else unchanged."""
    return _set_lr(process, state, "client_work", lr)


def _set_lr(process: tff.learning.templates.LearningProcess, state, part: str, lr: float):
    hparams = process.get_hparams(state)
    _optimizer_hparams(hparams, part)[tff.learning.optimizers.LEARNING_RATE_KEY] = np.float32(lr)
    return process.set_hparams(state, hparams)


_SCHEDULED = {"finalizer": "its server lr cannot follow a schedule", "client_work": "its client lr cannot decay"}


def _optimizer_hparams(hparams: Any, part: str) -> Any:
    """One optimizer's part of a composed process's hyperparameters ({client_work, finalizer})."""
    key = tff.learning.optimizers.LEARNING_RATE_KEY
    found = hparams.get(part) if hasattr(hparams, "get") else None
    if found is None or key not in found:
        raise ValueError(f"this learning process exposes no {part} {key!r} in its hyperparameters "
                         f"({hparams!r}): {_SCHEDULED[part]}")
    return found


def build_eval_process(model_config: ModelConfig, loop: str = "iterator") -> tff.learning.templates.LearningProcess:
    return tff.learning.algorithms.build_fed_eval(make_model_fn(model_config, eval_metrics),
                                                  loop_implementation=loop_implementation(loop))


def model_weights(weights: Sequence[np.ndarray]) -> tff.learning.models.ModelWeights:
    return tff.learning.models.ModelWeights(trainable=[np.asarray(w, np.float32) for w in weights], non_trainable=[])


def initialize(process: tff.learning.templates.LearningProcess, weights: Sequence[np.ndarray]):
    """process.initialize() with the global model set to `weights`."""
    return process.set_model_weights(process.initialize(), model_weights(weights))


def get_weights_from_state(process: tff.learning.templates.LearningProcess, state) -> list[np.ndarray]:
    return [np.asarray(w, np.float32) for w in process.get_model_weights(state).trainable]


def federated_evaluate(eval_process, weights: Sequence[np.ndarray], datasets: list) -> dict[str, float]:
    """Federated evaluation of `weights` on client datasets: token-weighted recall and loss over all."""
    state = eval_process.set_model_weights(eval_process.initialize(), model_weights(weights))
    output = eval_process.next(state, datasets)
    metrics = output.metrics["client_work"]["eval"]["current_round_metrics"]
    return flatten_metrics(metrics)


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Nested TFF metrics as {"a/b": float}."""
    out: dict[str, float] = {}
    if isinstance(metrics, (dict, collections.OrderedDict)):
        for key, value in metrics.items():
            out.update(flatten_metrics(value, f"{prefix}{key}/"))
    elif hasattr(metrics, "_asdict"):
        out.update(flatten_metrics(metrics._asdict(), prefix))
    else:
        try:
            out[prefix.rstrip("/")] = float(np.asarray(metrics))
        except (TypeError, ValueError):
            pass
    return out
