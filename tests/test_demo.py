"""The demo orchestrator (scripts/demo.py, scripts/supervisor.py): its process handling, and the whole job end to end.

Fast: settings, process-group stop, the sweep of leftover descendants.
Fast: the default DP-FTRL settings pass the server's noise check and fill their rounds; a missing
starting model fails with the command that builds it.
Slow (CI, `scripts/test.sh --all`): `scripts/demo.py --quick` from the shipped model to the keyboard
screenshot (the served model is never worse than the start; DP-FTRL, epsilon, delta and the guarantee
in summary.json); `--quick --tff-pretrain` up to the promotion of the pushed TFF model; Ctrl-C
(SIGINT) during TFF pre-training and SIGTERM during the fleet's rounds, each followed by a scan for
orphans: no process the demo started (server, tff_sim and its worker_binary, fleet) is left running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from models.pretrained import default_bundle_path
from scripts.admin_client import server_supports_secagg
from scripts.demo_settings import QUICK, Settings, build_parser
from scripts.errors import DemoError
from scripts.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (a unique run folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------------- fast


def test_quick_settings_and_flags():
    args = build_parser().parse_args(["--quick", "--rounds", "5", "--tff-pretrain", "--allow-noisy-dp", "false"])
    assert args.quick and args.tff_pretrain and args.rounds == 5 and args.allow_noisy_dp is False
    default = Settings()
    assert default.init_bundle == "" and default.population == "federated" and default.rounds >= 3
    assert default.server_optimizer in ("sgd", "momentum") and not default.allow_noisy_dp  # DP-FTRL's steps
    quick = Settings(**{**default.public(), **QUICK})
    assert quick.devices <= 10 and quick.rounds <= 2 and quick.allow_noisy_dp
    assert quick.preset == "tiny"  # --quick --tff-pretrain
    for s in (default, quick):  # a restart period needs K x round_goal distinct devices
        assert s.ftrl_restart_rounds * s.round_goal <= s.devices
        assert s.ftrl_restart_rounds * s.round_goal <= 0.9 * s.devices or s is quick
    # the fleet stops after the promotion (2 versions) plus the DP rounds; secagg detection answers
    ok, note = server_supports_secagg()
    assert isinstance(ok, bool) and "secure aggregation" in note


def test_default_dp_ftrl_settings_pass_the_servers_noise_check():
    from models import dp
    from models.config import preset
    from models.dp_noise_check import SERVER_KNOBS, check

    s = Settings()
    dim = preset("small").num_parameters()
    r = check("ftrl", s.noise_multiplier, s.clip_norm, s.min_count, dim, min_count=s.min_count, server_lr=s.server_lr,
              ftrl_rounds=s.ftrl_restart_rounds, knobs=SERVER_KNOBS)
    assert r.ok, r.message
    eps = dp.ftrl_epsilon(s.noise_multiplier, s.rounds, 1e-6, "restart", "rdp", rounds_per_epoch=s.ftrl_restart_rounds)
    assert 0 < eps < 30  # what the README and the settings' comment say (17.9)


def test_missing_starting_model_names_the_command_that_builds_it(tmp_path, monkeypatch):
    from scripts import demo

    with pytest.raises(DemoError, match="no model bundle"):
        demo.resolve_bundle(str(tmp_path / "nowhere"))
    monkeypatch.setattr("models.pretrained.DEFAULT_BUNDLE", tmp_path / "missing")
    with pytest.raises(DemoError, match=r"python -m models\.pretrained"):
        demo.resolve_bundle("")
    res = subprocess.run([sys.executable, str(DEMO), "--init-bundle", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "no model bundle" in res.stderr, res.stderr


def test_supervisor_stops_the_whole_process_group(tmp_path):
    sup = Supervisor(tmp_path, dict(os.environ))
    # a child that starts a grandchild and ignores SIGTERM: only the group SIGKILL ends both
    child = sup.spawn("stubborn", ["bash", "-c", "trap '' TERM; sleep 300 & echo started; wait"])
    deadline = time.monotonic() + 10
    while "started" not in child.lines and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [child.proc.pid] + [p.pid for p in psutil.Process(child.proc.pid).children(recursive=True)]
    assert len(family) == 2
    t = time.monotonic()
    sup.stop(child, timeout=1.0)
    assert time.monotonic() - t < 10
    assert alive(family) == []
    assert (tmp_path / "logs" / "stubborn.log").read_text().strip() == "started"


def test_sweep_kills_descendants_that_left_their_group(tmp_path):
    # A grandchild in its own session (like a daemonizing worker) escapes a process-group kill; the
    # sweep finds it among the descendants. Run in a subprocess: the sweep kills every descendant of
    # the process that calls it (TFF's worker_binary of this test session included).
    script = f"""
import json, subprocess, sys, time, psutil
from scripts import supervisor as d
d.become_subreaper()
mid = subprocess.Popen([sys.executable, "-c", "import subprocess,time; subprocess.Popen(['sleep','300'], start_new_session=True); time.sleep(300)"])
while len(psutil.Process().children(recursive=True)) < 2: time.sleep(0.05)
pids = [p.pid for p in psutil.Process().children(recursive=True)]
n = d.Supervisor.sweep()
print(json.dumps({{"pids": pids, "swept": n}}))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["pids"]) == 2 and got["swept"] >= 2
    assert alive(got["pids"]) == []


# ----------------------------------------------------------------------------------- slow


def _start_demo(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DISPLAY", None)
    return subprocess.Popen([sys.executable, str(DEMO), "--quick", "--out", str(out), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_demo(out: Path, *extra: str, timeout: float = 600) -> str:
    """Runs `demo.py --quick` to its end (its whole process group killed if it outlives `timeout`); its
    output, after asserting it exited 0."""
    proc = _start_demo(out, *extra)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(stdout[-6000:])
    assert proc.returncode == 0, stdout[-4000:]
    return stdout


@pytest.mark.slow
def test_demo_quick_runs_the_whole_job(tmp_path):
    out = tmp_path / "demo"
    stdout = _run_demo(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["flow"] == "init-bundle"
    assert summary["starting_model"]["path"] == str(default_bundle_path()) and summary["starting_model"]["version"] == 1
    assert summary["server"]["config"]["dp_mode"] == "ftrl" and summary["server"]["config"]["release_gate"] == "eval"
    rounds = summary["rounds"]
    assert len(rounds) == summary["settings"]["rounds"] == 2
    assert all(r["aggregated"] >= summary["settings"]["min_count"] for r in rounds)
    assert all(r["mechanism"] == "DP-FTRL" for r in rounds)
    eps = [r["epsilon"] for r in rounds]
    assert eps == sorted(eps) and eps[0] > 0  # the ledger only grows
    # release gating: every trained version was evaluated against the served one before it was served
    assert all(r["release"] in ("served", "held back") and r["eval_round"] for r in rounds)
    served = summary["served"]
    assert served["start"] == 1 and served["final"] in [1, *served["released"]]
    chain = {1: None} | {r["version"]: r for r in rounds if r["release"] == "served"}
    v = served["final"]
    while v != served["start"]:  # the final served model is not worse than the start, release by release
        r = chain[v]
        assert r["eval"]["candidate_recall"] >= r["eval"]["baseline_recall"]
        assert r["eval"]["baseline_version"] == r["base_version"]
        v = r["base_version"]
    for r in rounds:
        if r["release"] == "held back":
            assert r["release_reason"] and r["version"] != served["final"]
            assert r["release_state"] == "held_back"  # /v1/admin/versions agrees
    assert summary["versions"][str(served["final"])]["release_state"] == "served"
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "DP-FTRL" and privacy["epsilon"] == eps[-1] and privacy["delta"] == 1e-6
    assert "DP-FTRL" in privacy["guarantee"] and "epsilon" in privacy["guarantee"]
    recall = summary["recall"]
    assert recall["1"]["top1_recall"] > 0.05  # the shipped model is trained, served from the first second
    assert (out / "keyboard.png").stat().st_size > 1000 and (out / "status.html").exists()
    assert summary["personalization"]["gain"]["train_messages"] > 0
    for line in ("== 1/5", "== 2/5", "== 3/5", "== 4/5", "== 5/5", "status page:", "keyboard rendered offscreen",
                 "guarantee: DP-FTRL", "served model: version"):
        assert line in stdout
    assert processes_mentioning(str(out)) == []


@pytest.mark.slow
def test_demo_quick_tff_pretrain_pushes_and_promotes(tmp_path):
    """The earlier flow stays demonstrated: TFF pre-trains from random weights, pushes a candidate, the
    fleet's evaluation round promotes it."""
    out = tmp_path / "demo"
    stdout = _run_demo(out, "--tff-pretrain", "--stop-after", "promotion")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flow"] == "tff-pretrain" and summary["pretrain"]["push"]["version"] == 2
    assert summary["promotion"]["candidate"] == 2 and summary["promotion"]["global_version"] == 3
    recall = summary["recall"]
    assert recall["1"]["top1_recall"] < recall["2"]["top1_recall"]  # TFF helped
    assert "pushed: candidate version 2" in stdout
    assert processes_mentioning(str(out)) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "tff"), (signal.SIGTERM, "fleet")],
                         ids=["sigint-during-tff", "sigterm-during-fleet"])
def test_interrupted_demo_leaves_no_processes(tmp_path, sig, when):
    out = tmp_path / "demo"
    proc = _start_demo(out, *(["--tff-pretrain"] if when == "tff" else []))
    me = psutil.Process(proc.pid)
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    try:
        # wait for the stage to be busy: TFF's worker_binary running, or the fleet's devices ready
        while time.monotonic() < deadline and proc.poll() is None:
            kids = me.children(recursive=True)
            seen.update(p.pid for p in kids)
            names = []
            for p in kids:
                try:
                    names.append(" ".join(p.cmdline()))
                except psutil.NoSuchProcess:
                    pass
            if when == "tff" and any("worker_binary" in n for n in names):
                break
            if when == "fleet" and (out / "logs" / "fleet.log").exists() and \
                    "devices ready" in (out / "logs" / "fleet.log").read_text(errors="replace"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the demo ended before the stage under test"
        seen.update(p.pid for p in me.children(recursive=True))
        assert seen, "the demo has no children to clean up"
        os.kill(proc.pid, sig)
        stdout, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    print(stdout[-3000:])
    assert proc.returncode == 128 + sig, stdout[-3000:]
    assert "stopping every process" in stdout
    assert alive(sorted(seen)) == [], "children of the demo survived it"
    assert processes_mentioning(str(out)) == []
