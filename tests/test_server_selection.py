"""DP-FedAvg's cohort selection (issue #14 items 2 and 4), on a real server over loopback.

With --selection-q q the server draws each round's cohort in secret: device d is in round r's cohort iff
HMAC-SHA256(key_r, d) / 2^256 < q, key_r built from the round's secret seed (server/strategy/dp.py), before
and independently of check-in; everyone else is refused with retry reason not_selected and told to come
back when the round is expected to end. The ledger then uses exactly q. Without --selection-q the ledger
uses q = 1 (no amplification) and every report says so. delta is 1e-6 unless set.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from models import dp
from server.config import SELECTION_UNCAPPED, ServerConfig
from server.privacy_account import accounted_round
from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import dyadic_delta, encode_delta

Z = 1.0


def open_round(srv) -> tuple[int, int]:
    """(id, secret seed) of the open training round, read from the server's store (never served)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = srv.query("SELECT id, seed FROM rounds WHERE kind = 'train' AND state = 'open'")
        if rows:
            return int(rows[0]["id"]), int(rows[0]["seed"])
        time.sleep(0.05)
    raise AssertionError("no open training round")


def hmac_selected(round_id: int, seed: int, device_id: str, q: float) -> bool:
    """The documented rule, computed independently of the server's code."""
    key = b"fk-dp-fedavg-selection\0" + seed.to_bytes(8, "big") + round_id.to_bytes(8, "big")
    digest = hmac.new(key, device_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest, "big") / 2 ** 256 < q


def test_selection_admits_exactly_the_secret_draw_and_the_ledger_uses_its_q(server_factory) -> None:
    q, deadline_s = 0.5, 8.0
    srv = server_factory("--dp-mode", "central", "--clip-norm", "1.0", "--noise-multiplier", str(Z), "--allow-noisy-dp",
                         "--selection-q", str(q), "--round-goal", "2", "--min-count", "2",
                         "--deadline-s", str(deadline_s))
    devices = [srv.device() for _ in range(24)]
    rid, seed = open_round(srv)
    want = {d.id for d in devices if hmac_selected(rid, seed, d.id, q)}
    assert 2 <= len(want) < len(devices)  # P(fewer than 2 of 24) ~ 1.5e-6 for a random seed

    # first the unselected devices, before anyone is admitted: refused, told to wait at least a full deadline
    outside = [d for d in devices if d.id not in want]
    for d in outside:
        answer = d.checkin()
        assert answer["action"] == "retry" and answer["reason"] == "not_selected", answer
        assert answer["retry_after"] >= deadline_s
    # then everyone in reverse order: the admitted set is the draw, whatever the order of check-in
    answers = {d.id: d.checkin() for d in reversed(devices)}
    admitted = {i for i, a in answers.items() if a["action"] == "train"}
    assert admitted == want
    t_first = time.time()
    for i, a in answers.items():
        if i not in want:
            assert a["reason"] == "not_selected"
            # back when the round is expected to end (its deadline is now about deadline_s away)
            assert a["retry_after"] >= deadline_s - 2
    # no goal or cap cuts the draw first-come: the round is still open after more than round_goal admissions
    summary = srv.round(rid)
    assert summary["state"] == "open" and summary["admitted"] == len(want)
    assert summary["goal"] == summary["max_admitted"] == SELECTION_UNCAPPED
    assert summary["params"]["selection_q"] == q

    # the selected devices upload; the round closes at its deadline with all of them
    for k, d in enumerate(devices):
        if d.id in want:
            assert d.upload(rid, encode_delta(dyadic_delta(k), 1)).status_code == 200
    rnd = srv.wait_round(rid, timeout=deadline_s + 30)
    assert rnd["state"] == "closed" and rnd["outcome"]["aggregated"] == len(want), rnd
    assert time.time() - t_first >= deadline_s - 1  # it waited for its deadline, not for a goal

    # the ledger's q is the setting, not aggregated / registered
    want_eps = dp.epsilon(Z, q, 1, 1e-6)
    assert rnd["sampling_prob"] == q and rnd["delta"] == 1e-6
    assert rnd["epsilon"] == pytest.approx(want_eps, rel=1e-9)
    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["epsilon"] == pytest.approx(want_eps, rel=1e-9) and privacy["delta"] == 1e-6
    assert privacy["sampling_prob"] == q and privacy["selection_q"] == q
    assert privacy["mechanism"] == "DP-FedAvg with selection q = 0.5"
    assert privacy["amplification"].startswith("Poisson selection q = 0.5")
    guarantee = privacy["guarantee"]
    assert guarantee.startswith("DP-FedAvg with selection q = 0.5: after 1 released round(s)")
    assert f"epsilon {dp.format_epsilon(want_eps)} at delta 1e-06 (RDP accountant)" in guarantee
    assert "secret random draw" in guarantee and "any one device" in guarantee
    # what devices show their users is the same report
    seen = devices[0].client.get("/v1/model/info").json()["privacy"]
    assert seen["guarantee"] == guarantee and seen["epsilon"] == pytest.approx(want_eps, rel=1e-9)

    # the round's secret seed is never served: not in check-in answers, round summaries, reports
    served = json.dumps([answers, srv.round(rid), privacy, srv.admin_get("/v1/admin/status"),
                         devices[0].client.get(f"/v1/rounds/{rid}").text])
    assert str(seed) not in served


def test_without_selection_the_ledger_assumes_every_device_in_every_round(server_factory) -> None:
    srv = server_factory("--dp-mode", "central", "--clip-norm", "1.0", "--noise-multiplier", str(Z), "--allow-noisy-dp",
                         "--round-goal", "2", "--min-count", "2", "--deadline-s", "60")
    devices = [srv.device() for _ in range(5)]  # 5 registered, 2 aggregated: q would have been 0.4
    tasks = [d.task() for d in devices[:2]]
    rid = tasks[0]["round_id"]
    for k, d in enumerate(devices[:2]):
        assert d.upload(rid, encode_delta(dyadic_delta(k), 1)).status_code == 200
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed"
    want_eps = dp.epsilon(Z, 1.0, 1, 1e-6)
    assert rnd["sampling_prob"] == 1.0 and rnd["delta"] == 1e-6
    assert rnd["epsilon"] == pytest.approx(want_eps, rel=1e-9)
    assert want_eps > dp.epsilon(Z, 0.4, 1, 1e-6)  # the amplification the old accounting claimed
    for privacy in (srv.admin_get("/v1/admin/privacy"), srv.admin_get("/v1/admin/status")["privacy"],
                    devices[0].client.get("/v1/model/info").json()["privacy"]):
        assert privacy["epsilon"] == pytest.approx(want_eps, rel=1e-9) and privacy["delta"] == 1e-6
        assert privacy["sampling_prob"] == 1.0 and privacy["selection_q"] is None
        assert privacy["mechanism"] == "DP-FedAvg without sampling (no amplification)"
        assert privacy["amplification"].startswith("none")
        assert "no amplification" in privacy["guarantee"] and "every device in every round" in privacy["guarantee"]
        assert "at delta 1e-06 (RDP accountant)" in privacy["guarantee"]


def test_no_dp_report_says_so_at_the_default_delta(server_factory) -> None:
    srv = server_factory()
    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["mechanism"] == "none" and privacy["delta"] == 1e-6 and privacy["epsilon"] == 0.0
    assert privacy["guarantee"].startswith("No differential privacy")


# ---------------------------------------------------------------------- configuration and accounting rules
def test_selection_config_rules() -> None:
    base = dict(dp_mode="central", clip_norm=1.0, noise_multiplier=1.0)
    assert ServerConfig().dp_delta == 1e-6 and ServerConfig(dp_delta=1e-5).dp_delta == 1e-5
    assert ServerConfig.from_dict({"dp_delta": None}).dp_delta == 1e-6
    cfg = ServerConfig(**base, selection_q=0.01, round_goal=10, min_count=5)
    p = cfg.round_params()
    assert p["selection_q"] == 0.01 and p["goal"] == p["max_admitted"] == SELECTION_UNCAPPED
    capped = ServerConfig(**base, selection_q=0.01, selection_max_cohort=50, min_count=5)
    assert capped.round_params()["max_admitted"] == capped.round_params()["goal"] == 50
    assert "selection_q" not in ServerConfig(**base).round_params()
    for bad in (dict(selection_q=0.0), dict(selection_q=1.5), dict(selection_max_cohort=10),
                dict(selection_q=0.1, secure_aggregation="secagg"),
                dict(selection_q=0.1, selection_max_cohort=3, min_count=5)):
        with pytest.raises(ValueError):
            ServerConfig(**{**base, **bad})
    with pytest.raises(ValueError, match="DP-FTRL"):
        ServerConfig(dp_mode="ftrl", clip_norm=1.0, noise_multiplier=1.0, selection_q=0.1)
    with pytest.raises(ValueError):
        ServerConfig(selection_q=0.1)  # dp_mode none: nothing to amplify


def test_accounted_rounds() -> None:
    # a round with a draw: its q; capped: sensitivity 2C, i.e. z / 2
    assert accounted_round(1.2, 0.05, {"selection_q": 0.05}) == (1.2, 0.05)
    assert accounted_round(1.2, 0.05, {"selection_q": 0.05, "selection_max_cohort": 40}) == (0.6, 0.05)
    # rounds closed before selection existed recorded q = aggregated / registered: re-accounted at q = 1
    assert accounted_round(1.2, 0.3, {"dp_mode": "central"}) == (1.2, 1.0)


def test_the_device_screen_shows_the_servers_sentence() -> None:
    from device_app.reports import describe_privacy

    sentence = dp.guarantee_sentence("dp-fedavg", 2.5, 1e-6, "rdp", "device", 3, sampling_probs=[1.0])
    report = {"epsilon": 2.5, "delta": 1e-6, "accountant": "rdp", "dp_mode": "central",
              "mechanism": "DP-FedAvg without sampling (no amplification)", "guarantee": sentence}
    line, text = describe_privacy(report)
    assert line == "2.5 at delta 1e-06 (RDP; DP-FedAvg without sampling (no amplification))" and text == sentence
    # an older server's report without a sentence claims nothing beyond its numbers
    assert "did not say" in describe_privacy({"epsilon": 1.0, "delta": 1e-5, "dp_mode": "central"})[1]
    assert describe_privacy(None)[0] == "unknown"
    assert describe_privacy({"epsilon": 0.0, "delta": 1e-6, "dp_mode": "none"})[1].startswith("No differential")
