"""The DP noise check (issue #19): models/dp_noise_check.py's math against Monte Carlo, its verdict and message,
the server refusing (and with --allow-noisy-dp starting) at start-up, and tff_sim refusing a --dp run."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models import dp, dp_ftrl
from models import dp_noise_check as nc
from models.config import preset
from server.config import ServerConfig
from server.dp_sanity import config_noise_report, round_noise_summary, startup_refusal
from server.round import TrainParams

ROOT = Path(__file__).resolve().parents[1]
SMALL_DIM = preset("small").num_parameters()  # 440,716
# the tutorial's server (docs/tutorial.md): distributed, clip 1, z 1, goal 20, min_count 18, Nesterov lr 1
TUTORIAL = ["--dp-mode", "distributed", "--clip-norm", "1.0", "--noise-multiplier", "1.0", "--round-goal", "20",
            "--min-count", "18", "--server-optimizer", "nesterov", "--server-momentum", "0.9"]


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("dim", [1, 2, 3, 10, 1000, SMALL_DIM])
def test_expected_chi_is_the_mean_norm_of_a_standard_normal(dim):
    chi = nc.expected_chi(dim)
    if dim == 1:
        assert chi == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    if dim == 2:
        assert chi == pytest.approx(math.sqrt(math.pi / 2), rel=1e-12)
    assert math.sqrt(dim - 0.5) * (1 - 1 / dim) <= chi <= math.sqrt(dim)
    if dim <= 1000:
        rng = np.random.default_rng(dim)
        norms = np.linalg.norm(rng.standard_normal((20_000 if dim < 10 else 4_000, dim)), axis=1)
        assert norms.mean() == pytest.approx(chi, rel=0.02 if dim < 10 else 0.005)


def _mechanism_noise_of_mean(mechanism: str, z: float, clip: float, n: int, m: int, dim: int,
                             rng: np.random.Generator) -> np.ndarray:
    """The noise in the mean of n all-zero clipped updates, drawn as the server and devices draw it
    (models.dp's device / central stddevs)."""
    mode = "central" if mechanism == "central" else mechanism
    device_std = dp.device_noise_stddev(mode, z, clip, m)
    total = np.zeros(dim)
    for _ in range(n):
        total += dp.add_gaussian_noise([np.zeros(dim, np.float32)], device_std, rng)[0]
    total += rng.standard_normal(dim) * dp.central_noise_stddev(mode, z, clip)
    return total / n


@pytest.mark.parametrize("mechanism,n,m", [("central", 7, 7), ("distributed", 5, 5), ("distributed", 8, 5),
                                           ("local", 6, 6)])
def test_std_and_norm_match_a_monte_carlo_of_the_mechanism(mechanism, n, m):
    z, clip, dim = 1.3, 0.7, 3000
    rng = np.random.default_rng(1)
    draws = np.stack([_mechanism_noise_of_mean(mechanism, z, clip, n, m, dim, rng) for _ in range(40)])
    report = nc.check(mechanism, z, clip, n, dim, min_count=m)
    assert draws.std() == pytest.approx(report.std_per_weight, rel=0.01)
    assert np.linalg.norm(draws, axis=1).mean() == pytest.approx(report.expected_noise_norm, rel=0.01)
    assert report.noise_to_clip == pytest.approx(report.expected_noise_norm / clip)
    expected_std = {"central": z * clip / n, "distributed": z * clip / math.sqrt(n * m),
                    "local": z * clip / math.sqrt(n)}[mechanism]
    assert report.std_per_weight == pytest.approx(expected_std, rel=1e-12)


@pytest.mark.parametrize("efficient", [True, False])
@pytest.mark.parametrize("rounds", [1, 4, 10])
def test_ftrl_std_is_the_largest_released_noise_of_the_tree(rounds, efficient):
    """DP-FTRL: run models/dp_ftrl.aggregate on zero updates; per round the released mean's noise (the residual)
    and the noise of the running prefix sum (what the FTRL model carries); the largest of their stds is F(T) zC/n."""
    z, clip, n, dim = 1.1, 0.5, 4, 20_000
    params = dp_ftrl.FtrlParams(noise_multiplier=z, clients_per_round=n, clip=clip, efficient=efficient)
    state = dp_ftrl.init(params, dim, seed=3)
    zeros = [[np.zeros(dim, np.float32)] for _ in range(n)]
    prefix = np.zeros(dim)
    worst = 0.0
    for _ in range(rounds):
        mean, state, _ = dp_ftrl.aggregate(state, params, zeros)
        prefix += mean
        worst = max(worst, float(np.std(mean)), float(np.std(prefix)))
    report = nc.check("ftrl", z, clip, n, dim, ftrl_rounds=rounds, ftrl_efficient=efficient)
    assert report.std_per_weight == pytest.approx(nc.ftrl_noise_factor(rounds, efficient) * z * clip / n)
    assert worst == pytest.approx(report.std_per_weight, rel=0.03)


def test_ftrl_factor_grows_with_the_tree_depth():
    # the plain tree: the residual at a power of two crosses every level: sqrt(depth)
    for rounds in (1, 2, 8, 10, 1000):
        assert nc.ftrl_noise_factor(rounds, efficient=False) == pytest.approx(math.sqrt(dp.tree_depth(rounds)))
    eff = [nc.ftrl_noise_factor(r) for r in (1, 10, 100, 1000, 4096)]
    assert eff == sorted(eff) and eff[0] == 1.0 and 1.4 < eff[1] < 1.6 and eff[-1] < math.sqrt(13)
    # beyond the exact range: the plain tree's bound
    assert nc.ftrl_noise_factor(nc.FTRL_EXACT_MAX_ROUNDS + 1) == pytest.approx(math.sqrt(13))


# --------------------------------------------------------------------------- verdict and message


def test_the_verdict_flips_at_the_limit_and_the_knobs_sit_on_it():
    base = dict(mechanism="distributed", noise_multiplier=1.0, clip=1.0, cohort=18, dim=SMALL_DIM, server_lr=1.0)
    r = nc.check(**base)
    assert r.noise_to_clip == pytest.approx(36.9, abs=0.05) and not r.ok and r.verdict == "too_noisy"
    assert nc.check(**base, max_noise_to_clip=r.step_noise_to_clip).ok
    assert not nc.check(**base, max_noise_to_clip=r.step_noise_to_clip * (1 - 1e-9)).ok
    assert nc.DEFAULT_MAX_NOISE_TO_CLIP == r.max_noise_to_clip == 10.0
    # each knob, at the value the message names, passes; a step past it fails
    assert r.min_cohort == 67
    assert nc.check(**{**base, "cohort": 67}).ok and not nc.check(**{**base, "cohort": 66}).ok
    assert nc.check(**{**base, "noise_multiplier": r.max_noise_multiplier * (1 - 1e-9)}).ok
    assert not nc.check(**{**base, "noise_multiplier": r.max_noise_multiplier * 1.001}).ok
    assert nc.check(**{**base, "server_lr": r.max_server_lr * (1 - 1e-9)}).ok
    assert not nc.check(**{**base, "server_lr": r.max_server_lr * 1.001}).ok
    # local: the cohort needed grows with the square
    loc = nc.check("local", 1.0, 1.0, 100, 10_000)
    assert loc.min_cohort == math.ceil((nc.expected_chi(10_000) / 10) ** 2)
    assert nc.check("local", 1.0, 1.0, loc.min_cohort, 10_000).ok
    assert not nc.check("local", 1.0, 1.0, loc.min_cohort - 1, 10_000).ok
    # no server_lr (adaptive optimizers): no lr knob, the ratio unscaled; the clip never matters
    assert nc.check("central", 1.0, 1.0, 18, SMALL_DIM).max_server_lr is None
    assert nc.check("central", 1.0, 5.0, 18, SMALL_DIM).noise_to_clip == pytest.approx(
        nc.check("central", 1.0, 0.1, 18, SMALL_DIM).noise_to_clip)
    assert nc.check("none", 0.0, 0.0, 18, SMALL_DIM).ok


def test_the_message_names_the_knobs_and_the_numbers():
    r = nc.check("distributed", 1.0, 1.0, 18, SMALL_DIM, server_lr=1.0, knobs=nc.SERVER_KNOBS)
    msg = r.message
    for text in ("distributed DP", "noise multiplier 1", "18 updates per round", "440,716 weights",
                 "std 0.0556 per weight", "36.9x the clip", "limit 10x",
                 "a cohort of >= 67 devices (--min-count", "noise multiplier <= 0.271 (--noise-multiplier) at 18 devices",
                 "server learning rate <= 0.271 (--server-lr", "--allow-noisy-dp", "--max-noise-to-clip"):
        assert text in msg, (text, msg)
    ok = nc.check("distributed", 1.0, 1.0, 72, SMALL_DIM, server_lr=1.0)
    assert ok.ok and ok.message.startswith("DP noise check:") and "9.22x the clip" in ok.message
    assert r.to_dict()["verdict"] == "too_noisy"


# --------------------------------------------------------------------------- the server's side


def test_server_config_check_and_round_summary():
    assert ServerConfig(max_noise_to_clip=10.0).allow_noisy_dp is False
    with pytest.raises(ValueError, match="max_noise_to_clip"):
        ServerConfig(max_noise_to_clip=0)
    tut = ServerConfig(dp_mode="distributed", noise_multiplier=1.0, clip_norm=1.0, round_goal=20, min_count=18,
                       server_optimizer="nesterov")
    assert "36.9x the clip" in startup_refusal(tut, SMALL_DIM)
    assert startup_refusal(dataclasses.replace(tut, allow_noisy_dp=True), SMALL_DIM) is None
    assert startup_refusal(dataclasses.replace(tut, max_noise_to_clip=40.0), SMALL_DIM) is None
    assert startup_refusal(tut, None) is None  # no model yet: postponed (logged)
    assert startup_refusal(ServerConfig(), SMALL_DIM) is None  # no DP
    adam = config_noise_report(dataclasses.replace(tut, server_optimizer="adam", server_lr=0.01), SMALL_DIM)
    assert adam.server_lr is None and adam.step_noise_to_clip == adam.noise_to_clip
    ftrl = config_noise_report(ServerConfig(dp_mode="ftrl", noise_multiplier=1.0, min_count=50, round_goal=50,
                                            ftrl_restart_rounds=10), 10_000)
    assert ftrl.ftrl_rounds == 10 and ftrl.ftrl_factor == pytest.approx(nc.ftrl_noise_factor(10))

    params = TrainParams(goal=20, min_count=18, max_admitted=23, deadline_s=60.0, dp_mode="distributed",
                         clip_norm=1.0, noise_multiplier=1.0)
    summary = round_noise_summary(params, 20, SMALL_DIM)
    assert summary["too_noisy"] and summary["n_aggregated"] == 20
    assert summary["noise_std_per_weight"] == pytest.approx(1.0 / math.sqrt(20 * 18))
    assert summary["noise_to_clip"] == pytest.approx(nc.expected_chi(SMALL_DIM) / math.sqrt(360))
    assert round_noise_summary(TrainParams(goal=2, min_count=2, max_admitted=2, deadline_s=1.0), 2, 100) == {}
    assert round_noise_summary(params, 0, SMALL_DIM) == {}


def _server_cmd(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
            "--admin-token", "t0ken", "--log-level", "info", *args]


def _refused(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_server_refuses_noisy_dp_at_startup_and_starts_with_the_override(tmp_path: Path):
    data = tmp_path / "srv"
    err = _refused(_server_cmd(data, "--init-preset", "small", *TUTORIAL))
    assert "refusing to start: DP noise would swamp the model" in err
    for text in ("36.9x the clip", "limit 10x", ">= 67 devices (--min-count", "--allow-noisy-dp"):
        assert text in err

    # --allow-noisy-dp: starts (the refused start stored nothing: this one initialises), with the warning
    port_file, log_path = tmp_path / "port", tmp_path / "srv.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_server_cmd(data, "--init-preset", "small", "--port-file", str(port_file),
                                            "--allow-noisy-dp", *TUTORIAL),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_file.exists(), log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "DP noise would swamp the model" in text and "starting anyway (--allow-noisy-dp)" in text
    assert "initialised with model config" in text

    # the data dir now holds the model: a restart without the override is refused from the stored model's size
    err = _refused(_server_cmd(data, *TUTORIAL))
    assert "36.9x the clip" in err
    # the limit is validated with the rest of the configuration (exit 2, no traceback)
    err = _refused(_server_cmd(data, *TUTORIAL, "--max-noise-to-clip", "-1"))
    assert "max_noise_to_clip must be > 0" in err


# --------------------------------------------------------------------------- tff_sim


def test_tff_sim_refuses_a_noisy_dp_run():
    from tff_sim.config import SimConfig, dp_noise_refusal, dp_noise_report, parse_args

    base = ["--preset", "small", "--dp", "--clients-per-round", "10", "--noise-multiplier", "1.0"]
    cfg = parse_args(base)
    msg = dp_noise_refusal(cfg)
    assert msg is not None and "(--clients-per-round)" in msg and "10 updates per round" in msg
    report = dp_noise_report(cfg)
    assert report.mechanism == "central" and report.dim == SMALL_DIM and report.server_lr == 1.0
    assert report.noise_to_clip == pytest.approx(nc.expected_chi(SMALL_DIM) / 10)
    allowed = parse_args([*base, "--allow-noisy-dp"])
    assert allowed.allow_noisy_dp and dp_noise_refusal(allowed) is None
    assert dp_noise_refusal(parse_args([*base, "--max-noise-to-clip", "100"])) is None
    assert dp_noise_refusal(parse_args(["--preset", "small", "--clients-per-round", "10"])) is None  # no --dp
    # the override and the limit watch the run, they do not change it: same identity, same resumable run
    assert allowed.config_hash() == cfg.config_hash()
    # a calibrated noise multiplier is only known with the population: checked when given
    calibrated = SimConfig(preset="small", dp=True, target_epsilon=5.0, clients_per_round=10)
    assert dp_noise_report(calibrated) is None
    assert dp_noise_report(calibrated, noise_multiplier=0.5).noise_multiplier == 0.5
    ftrl = dp_noise_report(parse_args(["--preset", "tiny", "--dp", "--dp-mechanism", "dp-ftrl", "--server-optimizer",
                                       "momentum", "--rounds", "40", "--clients-per-round", "20"]))
    assert ftrl.mechanism == "ftrl" and ftrl.ftrl_rounds == 40

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "tff_sim", *base, "--rounds", "1", "--output", "/nonexistent/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "refusing to start: DP noise would swamp the model" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_server_refuses_a_pushed_model_too_large_for_its_dp_settings(tmp_path: Path):
    """The start-up check, postponed on an empty server, runs when the model arrives (POST /v1/admin/init)."""
    from server.bootstrap import synthetic_vocab
    from tests.server_fixtures import ServerProcess

    srv = ServerProcess(tmp_path / "srv", TUTORIAL, tmp_path / "srv.log").start()
    try:
        small, tiny = preset("small"), preset("tiny")
        r = srv.admin_post("/v1/admin/init", json={"config": small.to_dict(),
                                                   "vocab": synthetic_vocab(small.vocab_size).to_dict()})
        assert r.status_code == 422 and r.json()["error"] == "dp_too_noisy", r.text
        assert "36.9x the clip" in r.json()["detail"] and "--allow-noisy-dp" in r.json()["detail"]
        # nothing was stored: a model small enough for these settings is accepted afterwards
        r = srv.admin_post("/v1/admin/init", json={"config": tiny.to_dict(),
                                                   "vocab": synthetic_vocab(tiny.vocab_size).to_dict()})
        assert r.status_code == 201, r.text
    finally:
        srv.stop()
