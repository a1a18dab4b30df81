"""The simulation loop: sample clients, run a TFF round, evaluate, account privacy, checkpoint, report."""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models import interrupts
from models.iterate_average import ema_update, ema_weights
from tff_sim import checkpoint, client_data, privacy, report, sampling
from tff_sim.config import SimConfig, dp_noise_refusal

log = logging.getLogger("tff_sim")


@dataclasses.dataclass
class RunResult:
    output: Path
    weights: list[np.ndarray]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    data: client_data.SimData


class _Timer:
    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.start = time.time()

    @property
    def total(self) -> float:
        return self.before + time.time() - self.start


def load_data(cfg: SimConfig) -> client_data.SimData:
    return client_data.prepare(
        cfg.dataset,
        preset_name=cfg.preset,
        vocab_size=cfg.vocab_size,
        data_seed=cfg.data_seed,
        max_train_clients=cfg.max_train_clients,
        eval_clients=cfg.eval_clients,
        eval_max_examples_per_client=cfg.eval_max_examples_per_client,
        final_eval_max_sentences=cfg.final_eval_max_sentences,
        population=cfg.population,
        vocab_source=cfg.vocab_source,
        init_bundle=cfg.init_bundle,
    )


def train_row(round_num: int, clients: int, output: Any, seconds: float, server_lr: float | None = None
              ) -> dict[str, Any]:
    from tff_sim.process import flatten_metrics

    m = flatten_metrics(output.metrics) if output is not None else {}
    row: dict[str, Any] = {
        "round": round_num,
        "clients": clients,
        "examples": int(m.get("client_work/train/num_examples", 0)),
        "tokens": int(m.get("client_work/train/num_tokens", 0)),
        "train_loss": m.get("client_work/train/loss"),  # mean over the cohort's batches of the masked token loss
        "round_seconds": round(seconds, 4),
    }
    if server_lr is not None:
        row["server_lr"] = server_lr  # the server step's learning rate (models/lr_schedule.py)
    for key in ("clip", "tree_agg_dpftrl_clip", "current_clip"):  # DP-FedAvg, DP-FTRL fixed, DP-FTRL adaptive
        if f"aggregator/dp_query_metrics/{key}" in m:
            row["clip"] = m[f"aggregator/dp_query_metrics/{key}"]
    if m.get("finalizer/update_non_finite"):
        row["update_non_finite"] = m["finalizer/update_non_finite"]
    return row


def run(cfg: SimConfig, data: client_data.SimData | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run (or resume) the simulation described by cfg; returns the final weights and summary.

    on_round(row) is called after each finished (and logged) round; an exception it raises
    stops the run like Ctrl-C does, after checkpointing that round.
    """
    import tensorflow_federated as tff

    from tff_sim import process, workers

    if cfg.workers and workers.current() is None:  # --workers: TFF's context is the workers for the whole run
        with workers.installed(cfg.workers):
            return run(cfg, data, on_round)
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    if data is None:
        log.info("phase: loading %s and building the vocabulary", cfg.dataset)
        data = load_data(cfg)
    model_config = data.model_config
    plan = privacy.plan(cfg, data.population)
    z = plan.noise_multiplier if plan else None
    if plan:  # the calibrated z and this vocabulary's exact model size: the start-up check could know neither
        refusal = dp_noise_refusal(cfg, dim=model_config.num_parameters(), noise_multiplier=z)
        if refusal is not None:
            raise SystemExit(f"python -m tff_sim: refusing to run: {refusal}")
    sampling_mode = cfg.sampling_mode
    schedule = cfg.lr_schedule
    log.info("data: %s", data.summary())
    log.info("server optimizer %s, learning rate %s", cfg.server_optimizer, schedule.describe(cfg.server_lr))
    if plan and plan.mechanism == "dp-ftrl":
        log.info("DP-FTRL: noise multiplier %.4g, %d rounds per epoch (%s), delta %.3g", plan.noise_multiplier,
                 plan.rounds_per_epoch, plan.ftrl_rule, plan.delta)
    elif plan:
        log.info("DP: noise multiplier %.4g, q %.4g, delta %.3g", plan.noise_multiplier, plan.sampling_prob, plan.delta)

    if cfg.fresh:  # forget an earlier run in this folder, so an interrupted fresh run cannot resume it
        checkpoint.remove(out)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    resume = checkpoint.exists(out)
    if resume:
        header = checkpoint.read_header(out)
        if header.get("config_hash") != cfg.config_hash():
            raise SystemExit(
                f"{out} holds a checkpoint of a different configuration (hash {header.get('config_hash')}, this one "
                f"{cfg.config_hash()}): pass --fresh to start over, or another --output"
            )
    log.info("phase: building the federated process (TensorFlow tracing)")
    learning = process.build_learning_process(cfg, model_config, noise_multiplier=z,
                                              restart_period=plan.restart_period if plan else None)
    w0 = data.initial_weights if data.initial_weights is not None else process.initial_weights(model_config, cfg.seed)
    log.info("phase: starting TFF's worker and initialising the server state")
    state = process.initialize(learning, w0)
    # --average-decay: m_r of models/iterate_average.py (m_0 = 0), checkpointed with the TFF state
    average = [np.zeros(np.shape(w), np.float64) for w in w0] if cfg.average_decay else None
    history: list[dict[str, Any]] = []
    start_round, resumed_from = 0, None
    if resume:
        if average is None:
            state, header = checkpoint.load(out, state)
        else:
            (state, average), header = checkpoint.load(out, (state, average))
        history, start_round = header["history"], int(header["round"])
        timer.before = float(header.get("wall_seconds", 0.0))
        resumed_from = start_round
        log.info("resuming from the checkpoint of round %d", start_round)
    saved = lambda: state if average is None else (state, average)  # noqa: E731
    served = lambda r: (process.get_weights_from_state(learning, state) if average is None or r == 0  # noqa: E731
                        else ema_weights(average, r, cfg.average_decay))
    save_header = lambda r: {  # noqa: E731
        "round": r, "config_hash": cfg.config_hash(), "history": history, "wall_seconds": timer.total,
        "config": cfg.public_dict(),
    }

    eval_process = process.build_eval_process(model_config, cfg.tff_loop) if data.eval_clients else None
    eval_sets = [client_data.eval_dataset(c, 64) for c in data.eval_clients.values()]

    def evaluate(weights: list[np.ndarray]) -> dict[str, Any]:
        m = process.federated_evaluate(eval_process, weights, eval_sets)
        return {"eval_top1_recall": m["top1_recall"], "eval_top3_recall": m["top3_recall"],
                "eval_loss": m["token_loss"], "eval_tokens": int(m["num_tokens"])}

    tb = report.TensorBoard(out / "tensorboard", enabled=cfg.tensorboard)
    if not history and eval_process is not None and cfg.eval_every:  # the starting point, once
        history.append({"round": 0, **evaluate(w0)})
        tb.log(history[-1])
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.rounds, initial=start_round, desc="rounds", unit="round", dynamic_ncols=True,
                   file=sys.stderr)
    last_done = start_round
    try:
        for r in range(start_round + 1, cfg.rounds + 1):
            interrupts.check()  # a stop some library swallowed ends the run here, between rounds
            ids = sampling.sample_clients(data.train_ids, r, cfg.seed, cfg.clients_per_round, sampling_mode)
            datasets = [
                client_data.client_dataset(data.train[cid], r, cfg.seed, cfg.client_epochs, cfg.batch_size,
                                           cfg.max_examples_per_client)
                for cid in ids
            ]
            lr = cfg.server_lr_at(r)
            if not schedule.is_constant:
                # A function of r alone, set before every round: a resumed run recomputes it, and the
                # checkpointed state's rate (the previous round's) is overwritten here.
                state = process.set_server_lr(learning, state, lr)
            if cfg.client_lr_decay:
                state = process.set_client_lr(learning, state, cfg.client_lr_at(r))
            started, traffic = time.time(), workers.mark()
            output = learning.next(state, datasets) if datasets else None  # Poisson may draw nobody
            row = train_row(r, len(ids), output, time.time() - started, server_lr=lr)
            if cfg.client_lr_decay:
                row["client_lr"] = cfg.client_lr_at(r)
            row.update(workers.since(traffic))  # --workers: worker count, bytes each way this round
            # The round is done: state, history and last_done move together, so a checkpoint
            # written from here on (even by the error handler) is consistent.
            new_state = output.state if output is not None else state
            if average is not None:
                average = ema_update(average, process.get_weights_from_state(learning, new_state), cfg.average_decay)
            state = new_state
            history.append(row)
            last_done = r
            if plan:
                for acc, eps in plan.epsilon(r).items():
                    row[f"epsilon_{acc}"] = eps
            if eval_process is not None and ((cfg.eval_every and r % cfg.eval_every == 0) or r == cfg.rounds):
                row.update(evaluate(served(r)))
            tb.log(row)
            report.write_metrics(out, history)
            if cfg.checkpoint_every and (r % cfg.checkpoint_every == 0 or r == cfg.rounds):
                checkpoint.save(out, saved(), save_header(r))
            if on_round is not None:
                on_round(row)
            if bar is None:
                log.info("round %d/%d done in %.1f s (train loss %s)", r, cfg.rounds, row["round_seconds"],
                         f"{row['train_loss']:.3f}" if row.get("train_loss") is not None else "-")
            else:
                post = {"loss": f"{row['train_loss']:.3f}" if row.get("train_loss") is not None else "-"}
                if "eval_top1_recall" in row:
                    post["top1"] = f"{100 * row['eval_top1_recall']:.1f}%"
                if plan:
                    post["eps"] = privacy.format_epsilon(row.get(f"epsilon_{plan.accountants[0]}", math.nan))
                bar.set_postfix(post)
                bar.update(1)
    except BaseException as exc:
        # Ctrl-C or an error: keep what is done, so the same command resumes from here.
        if interrupts.caused_by_stop(exc):
            interrupts.acknowledge(exc)  # a second Ctrl-C must not cut the checkpoint short
        if last_done > start_round or not checkpoint.exists(out):
            checkpoint.save(out, saved(), save_header(last_done))
            log.warning("stopped after round %d; checkpoint saved in %s (rerun the same command to resume)",
                        last_done, out)
        raise
    finally:
        if bar is not None:
            bar.close()
        tb.close()

    interrupts.check()
    weights = served(last_done)
    iterate = process.get_weights_from_state(learning, state) if average is not None else None
    summary = finish(cfg, data, out, weights, history, plan, timer, resumed_from, tff.__version__, iterate)
    return RunResult(out, weights, history, summary, data)


def final_evaluation(data: client_data.SimData, weights: list[np.ndarray]) -> dict[str, dict[str, float]]:
    from models.central import evaluate_keras

    return {
        split: evaluate_keras(data.model_config, weights, sentences, data.vocab, batch_size=128)
        for split, sentences in (("test", data.test_sentences), ("heldout", data.heldout_sentences))
        if sentences
    }


def finish(cfg: SimConfig, data: client_data.SimData, out: Path, weights: list[np.ndarray],
           history: list[dict[str, Any]], plan: privacy.PrivacyPlan | None, timer: _Timer,
           resumed_from: int | None, tff_version: str, iterate: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Final evaluation, model export, plots and report of the run's model `weights` (with --average-decay the
    average; `iterate`, the last round's own model, is then scored too, for comparison)."""
    from tff_sim import workers
    from tff_sim.export import export_model

    log.info("phase: final evaluation (%d test, %d held-out sentences)", len(data.test_sentences),
             len(data.heldout_sentences))
    final = final_evaluation(data, weights)
    interrupts.check()
    log.info("phase: writing the model, plots and report")
    trained = [row for row in history if row.get("round", 0) > 0]
    train_seconds = float(sum(row.get("round_seconds", 0.0) for row in trained))
    summary: dict[str, Any] = {
        "config": cfg.public_dict(),
        "config_hash": cfg.config_hash(),
        "tff_version": tff_version,
        "output": str(out),
        "rounds_done": len(trained),
        "sampling": cfg.sampling_mode,
        "server_lr_schedule": cfg.lr_schedule.describe(cfg.server_lr),
        "client_lr_decay": cfg.client_lr_decay,
        "data": data.summary(),
        "model_config": data.model_config.to_dict(),
        "model_parameters": data.model_config.num_parameters(),
        "final": final,
        "train_seconds": round(train_seconds, 2),
        "mean_round_seconds": round(train_seconds / max(1, len(trained)), 4),
        "resumed_from": resumed_from,
    }
    if iterate is not None:
        summary["average_decay"] = cfg.average_decay
        summary["final_iterate"] = final_evaluation(data, iterate)
    if (on_workers := workers.run_summary(cfg.workers, trained)) is not None:  # --workers: count, bytes per round
        summary["workers"] = on_workers
    if plan:
        summary["privacy"] = {**plan.to_dict(), "final_epsilon": plan.epsilon(len(trained)),
                              "guarantee": plan.guarantee(len(trained))}
    baselines = report.load_baselines(cfg.baselines)
    if baselines:
        summary["baselines"] = baselines
        summary["baselines_note"] = baselines_note(cfg, data)
    meta = {"rounds": len(trained), "config_hash": cfg.config_hash(), "dataset": cfg.dataset,
            "final": final, "dp": summary.get("privacy")}
    model_path = export_model(out, data.model_config, data.vocab, weights, len(trained), report._jsonable(meta))
    summary["model_path"] = str(model_path)
    plots = report.plot_all(out, history, baselines) if cfg.plots else []
    summary["wall_seconds"] = round(timer.total, 2)
    if cfg.push:
        summary["push"] = push_final(cfg, data, weights, len(trained), final)
    report.write_json(out / "summary.json", summary)
    report.write_report(out, summary, history, baselines, plots)
    return summary


def baselines_note(cfg: SimConfig, data: client_data.SimData) -> str:
    """Whether the baseline rows were measured on the same vocabulary and sentences as this run."""
    import json

    try:
        base = json.loads(Path(cfg.baselines).read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError, AttributeError):
        return "Baselines: their settings could not be read."
    same_vocab = base.get("vocab_hash") == data.vocab.content_hash()
    same_eval = (same_vocab and base.get("max_eval_sentences") == cfg.final_eval_max_sentences
                 and base.get("seed", 0) == cfg.data_seed and not cfg.max_train_clients and not base.get("clients"))
    where = f"preset {base.get('preset', '?')}, vocabulary {base.get('vocab_hash', '?')}"
    if same_eval:
        return f"Baselines ({where}): same vocabulary and the same evaluation sentences as this run: rows compare directly."
    if same_vocab:
        return f"Baselines ({where}): same vocabulary, but other evaluation sentences or clients than this run."
    return (f"Baselines ({where}): another vocabulary than this run's ({data.vocab.content_hash()}, "
            f"{len(data.vocab)} tokens): the rows are a reference, not a like-for-like comparison.")


def push_final(cfg: SimConfig, data: client_data.SimData, weights: list[np.ndarray], rounds: int,
               final: dict[str, Any]) -> dict[str, Any]:
    from tff_sim.push import PushError, push_model

    try:
        result = push_model(
            cfg.push, cfg.admin_token or "", data.model_config, data.vocab, weights, model_version=rounds,
            note=f"tff_sim {cfg.dataset}/{cfg.preset} {rounds} rounds ({cfg.config_hash()})",
            metadata={"source": "tff_sim", "config_hash": cfg.config_hash(),
                      "test_top1_recall": final.get("test", {}).get("top1_recall")},
            push_path=cfg.push_path,
        )
    except PushError as exc:
        log.error("push to %s failed [%s]: %s (the exported model is still in the run folder)", cfg.push, exc.reason, exc)
        return {"ok": False, "reason": exc.reason, "detail": str(exc)}
    log.info("pushed to %s: version %s (%s)", cfg.push, result.version, result.state)
    return {"ok": True, "version": result.version, "state": result.state, "initialized_server": result.initialized_server}
