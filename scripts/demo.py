#!/usr/bin/env python
"""The main job in one command: the server starts from the shipped donor-trained model, a fleet of devices
runs secure DP-FTRL rounds over the federated users, every trained version is evaluated before it is served,
then the keyboard.

    ./scripts/demo.sh                  # sets up, then runs this (about 10 minutes on 2 cores)
    .venv/bin/python scripts/demo.py   # the same without the setup check
    .venv/bin/python scripts/demo.py --quick         # the shipped model, 8 devices, 2 rounds (a few minutes)
    .venv/bin/python scripts/demo.py --tff-pretrain  # the earlier start: TFF pre-training, pushed as a candidate
    .venv/bin/python scripts/demo.py --serve         # keep the server (and its status page) up at the end

Stages (every child in its own process group; Ctrl-C or SIGTERM stops them all):

1. `python -m server` on a free loopback port, data in runs/demo-<time>/server, a fresh admin token,
   `--init-bundle models/pretrained/small` (models.pretrained.default_bundle_path(): a small CIFG trained
   centrally on the donors' text only, docs/donors.md), so version 1 is that model, served at once.
   DP-FTRL (`--dp-mode ftrl`, restart rule: each device in at most one round per --ftrl-restart-rounds),
   release gating (`--release-gate eval`), secure aggregation when this server supports it.
2. The starting model: where it came from (its meta.json) and its quality on held-out users, next to the
   KN 5-gram built from the same donors' text. With --tff-pretrain instead: the server starts empty,
   `python -m tff_sim --push` pre-trains from random weights (on the donors) and stages the candidate.
3. `python -m device_app --headless --fleet N --population federated` starts the devices (only the
   federated users' text, never the donors' nor the held-out users'); training starts. With
   --tff-pretrain the devices first evaluate and promote the pushed candidate.
4. DP-FTRL rounds. After every round the terminal shows the devices aggregated, the round's time, the
   new version, the cumulative epsilon, the version's recall on held-out chitchat users (measured here)
   and the release decision of its evaluation round (served, or held back and why). At the end:
   epsilon at delta with the server's guarantee sentence.
5. One more user (a held-out one) types their messages on a headless device, which downloads the
   served global model and personalizes it; the Kivy keyboard is rendered offscreen with a
   suggestion (a PNG), or opened when a display is there and --app is given.

Everything lands in the run folder: logs of every process, summary.json, the status page as HTML.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from models import interrupts  # noqa: E402 - after the path set-up
from scripts.admin_client import Admin, server_supports_secagg  # noqa: E402
from scripts.console import T0, pct, ppl, say, stage  # noqa: E402
from scripts.demo_settings import QUICK, Settings, build_parser  # noqa: E402
from scripts.errors import DemoError  # noqa: E402
from scripts.keyboard_stage import run_keyboard_stage  # noqa: E402
from scripts.recall import RecallMeter  # noqa: E402
from scripts.supervisor import Child, Supervisor, become_subreaper, check_alive  # noqa: E402

CHILD_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # this process: not even CUDA plugin registration errors

PY = sys.executable


# =====================================================================================  the demo


def resolve_bundle(path: str) -> Path:
    """The starting model's bundle directory: `path`, or the committed default; a clear error when missing."""
    from models.pretrained import COMMAND, default_bundle_path

    bundle = Path(path) if path else default_bundle_path()
    if not (bundle / "meta.json").is_file():
        how = (f"build it with `{COMMAND}` (trains the small CIFG on the donors' text; resumes), "
               "or pass --init-bundle DIR (a models.bundle directory)") if not path else \
            "pass a models.bundle directory (config.json, vocab.json, weights.fkw, meta.json)"
        raise DemoError(f"no model bundle at {bundle}: {how}, or run the earlier flow with --tff-pretrain")
    return bundle


def bundle_provenance(bundle: Path) -> dict[str, Any]:
    """What the demo says about its starting model: the bundle's meta (models.pretrained writes it)."""
    meta = json.loads((bundle / "meta.json").read_text())
    inner = meta.get("meta") or {}
    return {"path": str(bundle), "config_hash": meta.get("config_hash"), "vocab_hash": meta.get("vocab_hash"),
            "source": inner.get("source"), "command": inner.get("command"), "data": inner.get("data"),
            "quality_heldout": inner.get("quality_heldout")}


def release_of(eval_round: dict[str, Any]) -> tuple[str, str | None]:
    """(served | held back | ..., reason) of a closed evaluation round of a trained version."""
    o = eval_round.get("outcome") or {}
    decision = o.get("decision")
    if decision == "released":
        return "served", None
    if decision == "held_back":
        reason = o.get("reason") or ""
        return "held back", reason[len("held back: "):] if reason.startswith("held back: ") else reason or None
    return str(decision), o.get("reason")


class Demo:
    """The five stages, one method each, in order; every child process runs under self.sup."""

    STAGES = 5

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.s = settings
        self.tff = bool(args.tff_pretrain)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(args.out) if args.out else ROOT / "runs" / f"demo-{stamp}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        # the server requires it of every registration; the fleet (a child too) registers with it
        self.registration_key = secrets.token_urlsafe(24)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=CHILD_TF_LOG_LEVEL, FK_ADMIN_TOKEN=self.token,
                   FK_REGISTRATION_KEY=self.registration_key)
        env.pop("FK_DEVICE_DIR", None)
        self.sup = Supervisor(self.run_dir, env)
        self.admin: Admin | None = None
        self.meter: RecallMeter | None = None
        self.server: Child | None = None
        self.fleet: Child | None = None
        self.url = ""
        self.bundle: Path | None = None if self.tff else resolve_bundle(settings.init_bundle)
        self.summary: dict[str, Any] = {"settings": settings.public(), "run_dir": str(self.run_dir), "stages": {},
                                        "flow": "tff-pretrain" if self.tff else "init-bundle"}
        self.secagg = False
        self.start_version: int | None = None  # the served version training starts from
        self.candidate: int | None = None  # --tff-pretrain: the pushed candidate
        self.promoted: int | None = None

    # ------------------------------------------------------------------ helpers
    def _timed(self, name: str, started: float) -> None:
        self.summary["stages"][name] = round(time.monotonic() - started, 1)

    # ------------------------------------------------------------------ 1. server
    def start_server(self) -> None:
        t = time.monotonic()
        stage(1, self.STAGES, "aggregation server")
        s = self.s
        self.secagg, note = (False, "secure aggregation: off (--no-secagg)") if self.args.no_secagg \
            else server_supports_secagg()
        say(note)
        port_file = self.run_dir / "server.port"
        cmd = [PY, "-m", "server", "--host", "127.0.0.1", "--port", str(self.args.port), "--port-file", str(port_file),
               "--data-dir", str(self.run_dir / "server"), "--no-training-on-start",
               "--round-goal", str(s.round_goal), "--min-count", str(s.min_count), "--over-admit", str(s.over_admit),
               "--deadline-s", str(s.deadline_s), "--epochs", str(s.epochs), "--batch-size", str(s.batch_size),
               "--learning-rate", str(s.learning_rate), "--max-examples-per-update", str(s.max_examples_per_update),
               # DP-FTRL: devices clip, the server adds the tree's noise to the (securely aggregated) sum
               "--dp-mode", "ftrl", "--ftrl-rule", "restart", "--ftrl-restart-rounds", str(s.ftrl_restart_rounds),
               "--clip-norm", str(s.clip_norm), "--noise-multiplier", str(s.noise_multiplier),
               "--server-optimizer", s.server_optimizer, "--server-lr", str(s.server_lr),
               "--server-momentum", str(s.server_momentum), "--no-nesterov",
               # every trained version is evaluated by the fleet against the served one before it is served
               "--release-gate", "eval",
               "--candidate-eval-fraction", "1.0", "--eval-goal", str(s.eval_goal),
               "--eval-min-count", str(s.eval_min_count), "--eval-deadline-s", str(s.deadline_s),
               "--promotion-loss-tolerance", str(s.promotion_loss_tolerance),
               "--retry-min-s", "1", "--log-level", "warning",
               # every fleet device registers from 127.0.0.1 at start: a per-address burst that admits them
               "--registration-burst", str(max(100, s.devices)),
               # counts only, on loopback, for a browser (which sends no token); a real deployment keeps the default
               "--public-status"]
        if s.allow_noisy_dp:
            cmd += ["--allow-noisy-dp"]
        if self.bundle is not None:
            cmd += ["--init-bundle", str(self.bundle)]
        if self.secagg:
            cmd += ["--secure-aggregation", "secagg", "--secagg-neighbors", str(s.secagg_neighbors),
                    "--secagg-stage-s", str(s.secagg_stage_s)]
        self.server = self.sup.spawn("server", cmd, echo=lambda line: line if (
            " ERROR " in line or "Traceback" in line or "noise" in line.lower()) else None)
        deadline = time.monotonic() + 120
        import httpx

        while True:
            check_alive(self.server)
            if port_file.exists() and port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    if httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise DemoError("the server did not become healthy in 120 s")
            time.sleep(0.1)
        self.admin = Admin(self.url, self.token)
        cfg = self.admin.get("/v1/admin/config")
        say(f"server up at {self.url} (pid {self.server.proc.pid}), data in {self.run_dir / 'server'}")
        say(f"status page: {self.url}/status (public: --public-status; /metrics too)   admin token: "
            f"{self.run_dir / 'admin_token'}")
        (self.run_dir / "admin_token").write_text(self.token + "\n")
        os.chmod(self.run_dir / "admin_token", 0o600)
        say(f"DP: {cfg['dp_mode']} (DP-FTRL, restart every {cfg.get('ftrl_restart_rounds')} rounds: each device in at "
            f"most one round per period), clip {cfg['clip_norm']}, noise multiplier {cfg['noise_multiplier']}, "
            f"server {cfg.get('server_optimizer')} lr {cfg.get('server_lr')}; rounds of {cfg['round_goal']} updates "
            f"(min {cfg['min_count']}); release gate {cfg.get('release_gate')}; secure aggregation "
            f"{cfg.get('secure_aggregation', 'secagg' if self.secagg else 'none')}")
        keys = ("dp_mode", "clip_norm", "noise_multiplier", "round_goal", "min_count", "secure_aggregation",
                "ftrl_rule", "ftrl_restart_rounds", "server_optimizer", "server_lr", "server_momentum",
                "release_gate", "promotion_tolerance", "promotion_loss_tolerance", "allow_noisy_dp")
        self.summary["server"] = {"url": self.url, "secure_aggregation": self.secagg,
                                  "config": {k: cfg.get(k) for k in keys}}
        self._timed("server", t)

    # ------------------------------------------------------------------ 2. the starting model
    def starting_model(self) -> None:
        """The default flow: version 1 is the bundle the server was initialised with, served at once."""
        t = time.monotonic()
        stage(2, self.STAGES, "the starting model (served at once)")
        assert self.bundle is not None
        prov = bundle_provenance(self.bundle)
        st = self.admin.get("/v1/admin/status")
        self.start_version = self.promoted = int(st["global_version"])
        data = prov.get("data") or {}
        say(f"version {self.start_version}: {self.bundle} (config {prov['config_hash']}, vocabulary {prov['vocab_hash']})")
        if data.get("population") == "donors":
            split = data.get("donor_split") or {}
            say(f"trained centrally on the donors' text only ({split.get('donors', '?')} donors, "
                f"{data.get('train_sentences', '?'):,} sentences; vocabulary from {data.get('vocab_source')}): "
                f"no federated or held-out user's text; built by `{prov.get('command')}`")
        else:
            say(f"NOTE: this bundle's meta does not say it was trained on the donors only (source "
                f"{prov.get('source')!r}, data {data or 'not recorded'}): a development stand-in, not the shipped model")
        q = prov.get("quality_heldout") or {}
        if q:
            rows = ", ".join(f"{name} top-1 {pct(m.get('top1_recall'))}" for name, m in q.items())
            say(f"its meta (models.baselines, 5,000 held-out sentences): {rows}")
        self.summary["starting_model"] = prov | {"version": self.start_version}
        self.meter = RecallMeter(self.admin, self.s.eval_sentences, self.s.seed)
        self.meter.request(self.start_version)
        self._timed("starting_model", t)

    # ------------------------------------------------------------------ 2'. TFF pre-training (--tff-pretrain)
    def pretrain(self) -> None:
        t = time.monotonic()
        s = self.s
        donors = s.population == "federated"  # pre-train on the donors, the fleet is the federated users
        stage(2, self.STAGES, f"pre-training in TFF (preset {s.preset}, {s.pretrain_rounds} rounds x "
                              f"{s.pretrain_clients} clients, chitchat{' donors' if donors else ''}) and push")
        out = self.run_dir / "tff"
        cmd = [PY, "-m", "tff_sim", "--dataset", "chitchat", "--preset", s.preset, "--rounds", str(s.pretrain_rounds),
               "--clients-per-round", str(s.pretrain_clients), "--max-examples-per-client", str(s.pretrain_examples),
               "--eval-every", str(s.pretrain_rounds), "--eval-clients", "10",
               "--final-eval-max-sentences", str(s.pretrain_final_eval_sentences), "--seed", str(s.seed),
               "--output", str(out), "--fresh", "--no-progress", "--no-tensorboard", "--checkpoint-every", "0",
               "--push", self.url]
        if donors:  # every donor (89 on chitchat): a client cap is taken before the donor split and would leave ~4
            cmd += ["--population", "donors"]
        elif s.pretrain_max_train_clients:
            cmd += ["--max-train-clients", str(s.pretrain_max_train_clients)]
        baselines = ROOT / "artifacts" / "baselines" / "results.json"
        cmd += ["--baselines", str(baselines) if baselines.exists() else ""]

        def echo(line: str) -> str | None:
            keep = ("round ", "federated", "push", "pushed", "run folder", "ERROR", "Error", "Traceback", "data:",
                    "baseline")
            if "INFO tff_sim: data:" in line:
                return line.split("INFO tff_sim: ", 1)[1][:200]
            if any(k in line for k in keep):
                return line.split(" INFO tff_sim: ", 1)[-1][:200]
            return None

        tff = self.sup.spawn("tff", cmd, echo=echo)
        while tff.alive:
            check_alive(self.server)
            time.sleep(0.3)
        tff.reader.join(5)
        if tff.proc.returncode != 0:
            raise DemoError(f"tff_sim failed with code {tff.proc.returncode} (log {tff.log_path}):\n"
                            + "\n".join(tff.lines[-15:]))
        summary = json.loads((out / "summary.json").read_text())
        push = summary.get("push") or {}
        if not push or push.get("version") is None:
            raise DemoError(f"tff_sim did not push its model: {push}")
        st = self.admin.get("/v1/admin/status")
        self.candidate = int(push["version"])
        self.summary["pretrain"] = {"final": summary.get("final"), "wall_seconds": summary.get("wall_seconds"),
                                    "mean_round_seconds": summary.get("mean_round_seconds"), "push": push,
                                    "model_parameters": summary.get("model_parameters")}
        say(f"pushed: candidate version {self.candidate} (global version {st['global_version']}: random init), "
            f"{summary.get('model_parameters'):,} parameters")
        self.meter = RecallMeter(self.admin, s.eval_sentences, s.seed)
        self.meter.request(st["global_version"])
        self.meter.request(self.candidate)
        self._timed("pretrain", t)

    # ------------------------------------------------------------------ 3. fleet (+ promotion with --tff-pretrain)
    def start_fleet(self) -> None:
        t = time.monotonic()
        s = self.s
        stage(3, self.STAGES, f"{s.devices} headless devices ({s.population} users)"
              + (": evaluate the candidate, promote it" if self.tff else ": training starts"))
        # the fleet stops when the served version advanced this far (a held-back version does not advance it);
        # the demo stops it once every round's release is decided
        fleet_rounds = s.rounds + (2 if self.tff else 0)
        workers = s.workers
        if self.secagg:  # a device waits in SecAgg's key and unmasking stages: one thread per admitted device
            workers = max(workers, math.ceil(s.round_goal * s.over_admit) + 2)
        cmd = [PY, "-m", "device_app", "--headless", "--fleet", str(s.devices), "--dataset", "chitchat",
               "--server", self.url, "--rounds", str(fleet_rounds),
               "--duration", str(s.round_timeout_s * (s.rounds + 2)),
               "--workers", str(workers), "--p-eligible", str(s.p_eligible), "--p-dropout", str(s.p_dropout),
               "--step", str(s.step_s), "--max-wait", str(s.max_wait_s), "--seed", str(s.seed),
               "--data-dir", str(self.run_dir / "fleet"), "--json-out", str(self.run_dir / "fleet.json")]
        if s.population != "all":
            cmd += ["--population", s.population]

        def echo(line: str) -> str | None:
            if line.startswith("[fleet] "):
                return None if "global model version" in line else line[len("[fleet] "):]
            if "Traceback" in line or "Error" in line:
                return line
            return None

        self.fleet = self.sup.spawn("fleet", cmd, echo=echo)
        if not self.tff:
            self.admin.post("/v1/admin/training/start")
            say(f"training started from version {self.start_version} (the starting model)")
            self._timed("fleet_start", t)
            return
        start_version = self.admin.get("/v1/admin/status")["global_version"]
        deadline = time.monotonic() + s.promote_timeout_s + 120  # + the fleet's start (TensorFlow, data)
        shown: set[int] = set()
        promoted = None
        while promoted is None:
            check_alive(self.server, self.fleet)
            st = self.admin.get("/v1/admin/status")
            for r in self.admin.get("/v1/admin/rounds", params={"kind": "eval", "limit": 10})["rounds"]:
                if r["state"] == "closed" and r["id"] not in shown:
                    shown.add(r["id"])
                    o = r["outcome"] or {}
                    cand, base = o.get("candidate", {}), o.get("baseline", {})
                    say(f"evaluation round {r['id']}: candidate {r['candidate_version']} top-1 {pct(cand.get('recall'))} "
                        f"vs global {r['base_version']} {pct(base.get('recall'))} on {o.get('reports')} devices' "
                        f"held-back text -> {o.get('decision')}"
                        + (f" as version {r['result_version']}" if r.get("result_version") else ""))
                    if o.get("decision") == "promoted":
                        promoted = r["result_version"]
                    elif o.get("decision") == "rejected":
                        break
            if promoted is None and (time.monotonic() > deadline or (st["candidate_version"] is None
                                                                     and st["global_version"] == start_version
                                                                     and shown)):
                promoted = self._promote_by_admin()
            if promoted is None:
                time.sleep(0.5)
        self.promoted = self.start_version = int(promoted)
        self.meter.request(self.promoted, same_as=self.candidate)
        self.admin.post("/v1/admin/training/start")
        say(f"global model is now version {self.promoted} (the TFF model); training started")
        self.summary["promotion"] = {"candidate": self.candidate, "global_version": self.promoted,
                                     "by": "evaluation round" if shown else "admin API"}
        self._timed("promotion", t)

    def _promote_by_admin(self) -> int:
        say(f"the candidate was not promoted by an evaluation round in time: promoting version {self.candidate} "
            "through the admin API")
        body = self.admin.model_bytes(self.candidate)
        res = self.admin.post("/v1/admin/models", params={"promote": "true", "note": "demo: TFF pre-trained model"},
                              content=body, headers={"Content-Type": "application/octet-stream"})
        return int(res["version"])

    # ------------------------------------------------------------------ 4. DP-FTRL rounds, each gated
    def federate(self) -> None:
        t = time.monotonic()
        s = self.s
        mode = "secure aggregation + DP-FTRL" if self.secagg else "DP-FTRL (no secure aggregation)"
        stage(4, self.STAGES, f"{s.rounds} federated rounds, {mode}; each version evaluated before it is served")
        say("round  aggregated/admitted  not aggr.  seconds  version  epsilon   held-out top-1  top-3   perplexity"
            "  release")
        base = self.meter.wait(self.start_version, 300) or {}
        say(f"{'start':>5}  {'':>19}  {'':>9}  {'':>7}  {self.start_version:>7}  {0:7.3g}   "
            f"{pct(base.get('top1_recall'))}          {pct(base.get('top3_recall'))}  {ppl(base)}  served")
        done: list[dict[str, Any]] = []
        printed: set[int] = set()
        requested: set[int] = set()
        closed_train: set[int] = set()
        stopped = False
        last_progress = time.monotonic()
        last_closed_at = None
        while len(printed) < s.rounds:
            check_alive(self.server)
            rounds = sorted(self.admin.get("/v1/admin/rounds", params={"kind": "train", "limit": 100})["rounds"],
                            key=lambda r: r["id"])
            evals = {r["candidate_version"]: r for r in
                     self.admin.get("/v1/admin/rounds", params={"kind": "eval", "limit": 100})["rounds"]
                     if r["state"] == "closed" and (r.get("outcome") or {}).get("decision") in ("released", "held_back")}
            for r in rounds:
                if r["state"] == "closed" and r["result_version"] and r["result_version"] not in requested:
                    requested.add(r["result_version"])
                    self.meter.request(r["result_version"])
                    closed_train.add(r["id"])
                    last_progress = time.monotonic()
            if not stopped and len(closed_train) >= s.rounds:
                # the last version still goes through its evaluation round; no new training round opens
                self.admin.post("/v1/admin/training/stop")
                stopped = True
            for r in rounds:
                if r["id"] in printed or r["state"] not in ("closed", "abandoned"):
                    continue
                if r["state"] == "abandoned":
                    printed.add(r["id"])
                    say(f"round {r['id']} abandoned: {(r['outcome'] or {}).get('reason')}")
                    continue
                v = r["result_version"]
                rec = self.meter.get(v)
                ev = evals.get(v)
                if ev is None and time.monotonic() - last_progress < s.round_timeout_s:
                    break  # print rounds in order, each with its release decision ...
                if rec is None and time.monotonic() - last_progress < 120:
                    break  # ... and its recall
                printed.add(r["id"])
                start = r["created_at"] if last_closed_at is None else max(r["created_at"], last_closed_at)
                secs = r["closed_at"] - start
                last_closed_at = r["closed_at"]
                release, reason = release_of(ev) if ev else ("undecided", None)
                eo = (ev or {}).get("outcome") or {}
                row = {"round": r["id"], "aggregated": r["accepted"], "admitted": r["admitted"],
                       "dropouts": r["dropouts"], "seconds": round(secs, 1), "version": v,
                       "base_version": r.get("base_version"), "mechanism": r.get("mechanism"),
                       "epsilon": r["epsilon"], "delta": r["delta"], "recall": rec, "release": release,
                       "release_reason": reason, "eval_round": (ev or {}).get("id"),
                       "eval": {"candidate_recall": (eo.get("candidate") or {}).get("recall"),
                                "baseline_recall": (eo.get("baseline") or {}).get("recall"),
                                "baseline_version": (ev or {}).get("base_version"), "reports": eo.get("reports")}}
                done.append(row)
                rec = rec or {}
                say(f"{r['id']:>5}  {r['accepted']:>10}/{r['admitted']:<8}  {r['dropouts'] or 0:>9}  {secs:7.1f}  "
                    f"{v:>7}  {r['epsilon']:7.3g}   {pct(rec.get('top1_recall'))}          "
                    f"{pct(rec.get('top3_recall'))}  {ppl(rec)}  {release}"
                    + (f" ({reason})" if reason else "")
                    + (f" [devices: {pct(row['eval']['candidate_recall'])} vs {pct(row['eval']['baseline_recall'])}"
                       f" of version {row['eval']['baseline_version']}]" if ev else ""))
                if len(done) >= s.rounds:
                    break
            if len(printed) >= s.rounds:
                break
            if self.fleet is not None and not self.fleet.alive and len(done) < s.rounds:
                check_alive(self.fleet)
            if time.monotonic() - last_progress > s.round_timeout_s:
                raise DemoError(f"no training round finished in {s.round_timeout_s:.0f} s")
            time.sleep(0.5)
        if not stopped:
            self.admin.post("/v1/admin/training/stop")
        privacy = self.admin.get("/v1/admin/privacy")
        self.summary["rounds"] = done
        self.summary["privacy"] = privacy
        st = self.admin.get("/v1/admin/status")
        final = int(st["global_version"])
        # the server's own record of each version's release (served / held_back + reason / superseded)
        listing = self.admin.get("/v1/admin/versions")
        self.summary["versions"] = {str(v["version"]): {"release_state": v.get("release_state"),
                                                        "release_reason": v.get("release_reason"),
                                                        "source": v.get("source")}
                                    for v in listing.get("versions", [])}
        for row in done:
            rel = self.summary["versions"].get(str(row["version"])) or {}
            row["release_state"] = rel.get("release_state")  # as /v1/admin/versions says now
        self.summary["served"] = {"start": self.start_version, "final": final,
                                  "released": [r["version"] for r in done if r["release"] == "served"],
                                  "held_back": [r["version"] for r in done if r["release"] == "held back"]}
        say(f"training stopped after {len(done)} rounds: {len(self.summary['served']['released'])} versions served, "
            f"{len(self.summary['served']['held_back'])} held back; the served model is version {final}")
        say(f"privacy: {privacy.get('mechanism')}, epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:.2g} "
            f"({privacy['accountant']}, {privacy['dp_rounds']} DP rounds, {privacy['population']} devices)")
        if privacy.get("guarantee"):
            say(f"guarantee: {privacy['guarantee']}")
        if self.fleet is not None:
            try:
                self.fleet.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.sup.stop(self.fleet, timeout=30)  # SIGTERM: it writes its report and exits
            self.fleet.reader.join(5)
            fleet_json = self.run_dir / "fleet.json"
            if fleet_json.exists():
                rep = json.loads(fleet_json.read_text())
                self.summary["fleet"] = {k: rep.get(k) for k in ("devices", "seconds", "uploads", "outcomes",
                                                                 "uploads_per_round", "errors")}
                errors = rep.get("errors") or []
                late = sum(1 for e in errors if "round_closed" in e)
                say(f"fleet: {rep.get('uploads')} uploads, outcomes {rep.get('outcomes')}; errors: {len(errors) - late}"
                    + (f" (and {late} late reports refused with round_closed: their round had enough)" if late else ""))
        self._timed("federated_rounds", t)

    # ------------------------------------------------------------------ 5. the keyboard
    def keyboard(self) -> None:
        t = time.monotonic()
        stage(5, self.STAGES, "personalization and the keyboard")
        run_keyboard_stage(self.sup, self.server, self.url, self.run_dir, self.s.seed, self.args.app, self.summary)
        self._timed("keyboard", t)

    # ------------------------------------------------------------------ end
    def report(self) -> None:
        say()
        say("== summary ==")
        if self.tff:
            pre = self.summary.get("pretrain", {}).get("final", {}).get("heldout", {})
            say(f"TFF pre-training: held-out top-1 {pct(pre.get('top1_recall'))} (its own "
                f"{self.s.pretrain_final_eval_sentences}-sentence sample)")
        say(f"held-out top-1/top-3/perplexity: the demo's {self.s.eval_sentences:,}-sentence sample of held-out users")
        say("version  what                              held-out top-1  top-3   perplexity  epsilon  release")
        if self.tff:
            rows = [(1, "random init", None, ""), (self.candidate, "TFF pre-training (candidate)", None, ""),
                    (self.promoted, "promoted candidate", 0.0, "served")]
        else:
            rows = [(self.start_version, "starting model", 0.0, "served")]
        for r in self.summary.get("rounds", []):
            rows.append((r["version"], f"after round {r['round']} (secure, DP-FTRL)" if self.secagg
                         else f"after round {r['round']} (DP-FTRL)", r["epsilon"],
                         r["release"] + (f" ({r['release_reason']})" if r.get("release_reason") else "")))
        recall = {}
        for v, what, eps, release in rows:
            rec = self.meter.wait(v, 120) if self.meter else None
            rec = rec or {}
            recall[v] = rec
            say(f"{v:>7}  {what:32s}  {pct(rec.get('top1_recall'))}          {pct(rec.get('top3_recall'))}  "
                f"{ppl(rec)}    {'' if eps is None else f'{eps:7.3g}'}  {release}")
        self.summary["recall"] = {str(k): v for k, v in recall.items()}
        served = self.summary.get("served")
        if served:
            final, start = served["final"], served["start"]
            f1, s1 = (recall.get(final) or {}).get("top1_recall"), (recall.get(start) or {}).get("top1_recall")
            say(f"served model: version {final} (started from {start}): held-out top-1 {pct(f1)} vs {pct(s1)} at the start")
            privacy = self.summary.get("privacy") or {}
            if privacy:
                say(f"privacy: epsilon {privacy.get('epsilon', math.nan):.3g} at delta {privacy.get('delta', math.nan):.2g}"
                    f" ({privacy.get('mechanism')}): {privacy.get('guarantee')}")
            self._compare_ngram(f1)
        if self.meter and self.meter.errors:
            say(f"recall measurement errors: {self.meter.errors}")
        try:
            html = self.admin.http.get("/status").text
            (self.run_dir / "status.html").write_text(html, encoding="utf-8")
            say(f"status page: {self.url}/status (saved as {self.run_dir / 'status.html'})")
        except Exception as exc:  # noqa: BLE001
            say(f"could not save the status page: {exc}")
        if self.summary.get("screenshot"):
            say(f"keyboard screenshot: {self.summary['screenshot']}")

    def _compare_ngram(self, top1: float | None) -> None:
        """The served model's held-out top-1 over the KN 5-gram built from the donors' text (the bundle's meta)."""
        q = (self.summary.get("starting_model") or {}).get("quality_heldout") or {}
        kn = (q.get("ngram-5") or {}).get("top1_recall")
        if kn is None or top1 is None:
            say("KN 5-gram comparison: not available (the starting model's meta has no quality_heldout['ngram-5'])")
            return
        same = self.s.eval_sentences == 5000 and self.s.seed == 0
        ratio = top1 / kn
        sample = ("the same 5,000 held-out sentences (models.baselines' seeded sample)" if same else
                  f"NOT the same sample: the model on the demo's {self.s.eval_sentences:,} sentences, the 5-gram on "
                  "models.baselines' 5,000")
        say(f"served model vs KN 5-gram on the donors' text: top-1 {pct(top1)} / {pct(kn)} = {ratio:.3f} ({sample})")
        self.summary["vs_ngram5"] = {"model_top1": top1, "ngram5_top1": kn, "ratio": ratio, "same_sample": same}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    values = Settings().public()
    if args.quick:
        values.update(QUICK)
    for f in dataclasses.fields(Settings):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    settings = Settings(**values)
    if settings.population not in ("all", "federated"):
        print(f"--population must be all or federated, got {settings.population!r}", file=sys.stderr)
        return 2
    if settings.server_optimizer not in ("sgd", "momentum"):
        print(f"DP-FTRL's server step is sgd or momentum, got {settings.server_optimizer!r}", file=sys.stderr)
        return 2

    interrupts.install()  # Ctrl-C / SIGTERM raise Interrupted here, never lost in a finalizer
    become_subreaper()
    try:
        demo = Demo(args, settings)
    except DemoError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    say(f"federated keyboard demo: run folder {demo.run_dir}")
    if demo.tff:
        say(f"settings: TFF pre-training (preset {settings.preset}, {settings.pretrain_rounds} rounds), "
            f"{settings.devices} devices, {settings.rounds} DP-FTRL rounds of {settings.round_goal}")
    else:
        say(f"settings: starting model {demo.bundle}, {settings.devices} devices ({settings.population} users), "
            f"{settings.rounds} DP-FTRL rounds of {settings.round_goal}, restart every {settings.ftrl_restart_rounds}")
    code = 0
    try:
        demo.start_server()
        if args.stop_after != "server":
            demo.pretrain() if demo.tff else demo.starting_model()
        if args.stop_after not in ("server", "pretrain"):
            demo.start_fleet()
        if args.stop_after not in ("server", "pretrain", "promotion"):
            demo.federate()
        if args.stop_after is None:
            demo.keyboard()
        if args.stop_after not in ("server", "pretrain"):
            demo.report()
        if args.serve:
            say(f"serving {demo.url}/status until Ctrl-C")
            while True:
                check_alive(demo.server)
                time.sleep(1)
    except BaseException as exc:
        if interrupts.caused_by_stop(exc):
            code = interrupts.acknowledge(exc)  # later signals: "already stopping", the cleanup goes on
            say()
            say(f"{signal.Signals(code - 128).name}: stopping every process")
        elif isinstance(exc, DemoError):
            say(f"FAILED: {exc}")
            code = 1
        elif isinstance(exc, Exception):
            import traceback

            traceback.print_exc()
            say(f"FAILED: {exc.__class__.__name__}: {exc}")
            code = 1
        else:
            raise
    finally:
        interrupts.acknowledge()  # a signal from here on must not cut the cleanup short
        demo.summary["wall_seconds"] = round(time.monotonic() - T0, 1)
        demo.summary["exit_code"] = code
        try:
            (demo.run_dir / "summary.json").write_text(json.dumps(demo.summary, indent=2, default=str) + "\n")
        except OSError:
            pass
        if demo.meter is not None:
            demo.meter.close()
        if demo.admin is not None:
            demo.admin.close()
        demo.sup.stop_all()
        say(f"{'done' if code == 0 else 'stopped'} in {time.monotonic() - T0:.0f} s; everything is in {demo.run_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
