"""The server's DP noise check (models/dp_noise_check.py): at start-up, and per round.

* `startup_refusal(config, dim)`: run by `python -m server` once the model's size is known (the data dir's
  model, or the one --init-bundle / --init-preset is about to store), before anything is served. Returns
  the refusal message when one round's noise would exceed `max_noise_to_clip` x the clip (the server then
  exits 2), or None (start; with `allow_noisy_dp` a too-noisy setting is logged as a warning instead).
  The cohort is min_count: the fewest updates a round may close with carries the most noise on its mean.
* `round_noise_summary(params, n_aggregated, dim)`: the same numbers for a closed round with the count
  it actually aggregated (a dict for the round's outcome / log).
"""
from __future__ import annotations

import logging
from typing import Any

from models import dp_noise_check
from models.dp_noise_check import DEFAULT_MAX_NOISE_TO_CLIP, SERVER_KNOBS, NoiseReport

log = logging.getLogger("server.dp_sanity")

# Optimizers whose step is lr * (the averaged update): the server learning rate scales the noise's step.
# adam / yogi / adagrad normalise per coordinate, so their lr does not (the check leaves it out).
SGD_LIKE = ("sgd", "momentum", "nesterov")


def _server_lr(optimizer: str, lr: float) -> float | None:
    return float(lr) if optimizer in SGD_LIKE else None


def _ftrl_rounds(rule: str, restart_rounds: int) -> int:
    # restart: one tree per period; min_separation: one tree for ever (the check assumes a horizon)
    return int(restart_rounds) if rule == "restart" else dp_noise_check.FTRL_DEFAULT_HORIZON


def config_noise_report(config: Any, dim: int, cohort: int | None = None) -> NoiseReport | None:
    """The noise report for a ServerConfig and a model of `dim` weights (None when dp_mode is none).
    `cohort` defaults to min_count (the worst case: the fewest updates a round may close with)."""
    if config.dp_mode == "none":
        return None
    return dp_noise_check.check(
        config.dp_mode, config.value_noise_multiplier, config.clip_norm, int(cohort or config.min_count), int(dim),
        min_count=config.min_count, server_lr=_server_lr(config.server_optimizer, config.server_lr),
        max_noise_to_clip=getattr(config, "max_noise_to_clip", DEFAULT_MAX_NOISE_TO_CLIP),
        ftrl_rounds=_ftrl_rounds(config.ftrl_rule, config.ftrl_restart_rounds),
        ftrl_efficient=bool(config.ftrl_efficient), knobs=SERVER_KNOBS)


def startup_refusal(config: Any, dim: int | None) -> str | None:
    """None: start (logging the check); else the message to print before refusing to start."""
    if config.dp_mode == "none":
        return None
    limit = getattr(config, "max_noise_to_clip", DEFAULT_MAX_NOISE_TO_CLIP)
    if dim is None:
        largest = dp_noise_check.max_dim_within_limit(
            config.dp_mode, config.value_noise_multiplier, config.min_count, min_count=config.min_count,
            server_lr=_server_lr(config.server_optimizer, config.server_lr), max_noise_to_clip=limit,
            ftrl_rounds=_ftrl_rounds(config.ftrl_rule, config.ftrl_restart_rounds),
            ftrl_efficient=bool(config.ftrl_efficient))
        log.warning("DP noise check postponed: no model yet. With %s DP, noise multiplier %g and min_count %d, a "
                    "model of more than %s weights gets round noise above %gx the clip (the small preset has 440,716)",
                    config.dp_mode, config.noise_multiplier, config.min_count,
                    "any number of" if largest is None else f"{largest:,}", limit)
        return None
    report = config_noise_report(config, dim)
    assert report is not None
    if report.ok:
        log.info("%s", report.message)
        return None
    if getattr(config, "allow_noisy_dp", False):
        log.warning("%s -- starting anyway (--allow-noisy-dp)", report.message)
        return None
    return report.message


def round_noise_summary(params: Any, n_aggregated: int, dim: int, *,
                        max_noise_to_clip: float = DEFAULT_MAX_NOISE_TO_CLIP,
                        server_optimizer: str | None = None, server_lr: float | None = None) -> dict[str, Any]:
    """The noise of a closed round's averaged update, from its frozen TrainParams and the updates it aggregated.

    {} for a round without DP noise (dp_mode none, or nothing aggregated). Otherwise a JSON-able dict:
    dp_mode, n_aggregated, noise_std_per_weight, expected_noise_norm, noise_to_clip (and step_noise_to_clip,
    scaled by server_lr when an SGD-like server_optimizer and its lr are given), max_noise_to_clip,
    too_noisy (bool) and message (a warning to log when too_noisy).
    """
    mode = getattr(params, "dp_mode", "none")
    if mode == "none" or n_aggregated < 1 or params.noise_multiplier <= 0 or params.clip_norm <= 0:
        return {}
    lr = _server_lr(server_optimizer, server_lr) if server_optimizer and server_lr else None
    report = dp_noise_check.check(
        mode, getattr(params, "value_noise_multiplier", params.noise_multiplier), params.clip_norm,
        int(n_aggregated), int(dim),
        min_count=int(params.min_count), server_lr=lr, max_noise_to_clip=max_noise_to_clip,
        ftrl_rounds=_ftrl_rounds(params.ftrl_rule, params.ftrl_restart_rounds) if mode == "ftrl" else None,
        ftrl_efficient=bool(getattr(params, "ftrl_efficient", True)), knobs=SERVER_KNOBS)
    return {
        "dp_mode": mode, "n_aggregated": int(n_aggregated), "dim": int(dim),
        "noise_std_per_weight": report.std_per_weight, "expected_noise_norm": report.expected_noise_norm,
        "noise_to_clip": report.noise_to_clip, "step_noise_to_clip": report.step_noise_to_clip,
        "max_noise_to_clip": report.max_noise_to_clip, "too_noisy": not report.ok, "message": report.message,
    }


__all__ = ["SGD_LIKE", "config_noise_report", "startup_refusal", "round_noise_summary"]
