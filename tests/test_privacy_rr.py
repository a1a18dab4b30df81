"""Randomized-response telemetry: the estimator is unbiased (seeded simulation), its interval covers,
the epsilon is ln 3 for fair coins; devices report through the real server, which keeps only counts."""
from __future__ import annotations

import math
import random

import httpx
import numpy as np
import pytest

from device_app.http_client import ServerAPI, ServerError
from device_app.telemetry import SessionFacts, TelemetryReporter
from models import rr
from tests.server_fixtures import ServerProcess, server_factory  # noqa: F401 (fixture)


def test_fair_coins_match_the_survey_formulas() -> None:
    coins = rr.Coins()
    assert coins.p_yes_true == 0.75 and coins.p_yes_false == 0.25
    assert rr.local_epsilon(coins) == pytest.approx(math.log(3))
    for yes, n in [(600, 1000), (250, 1000), (1000, 1000)]:
        assert rr.estimate(yes, n, coins)["rate"] == pytest.approx(2 * yes / n - 0.5)
    biased = rr.Coins(0.75, 0.3)
    a, b = 0.75 + 0.25 * 0.3, 0.25 * 0.3
    assert rr.local_epsilon(biased) == pytest.approx(math.log(max(a / b, (1 - b) / (1 - a))))
    with pytest.raises(ValueError):
        rr.Coins(1.0, 0.5)


@pytest.mark.parametrize("coins", [rr.Coins(0.5, 0.5), rr.Coins(0.3, 0.7), rr.Coins(0.8, 0.2)])
def test_estimator_is_unbiased_and_its_interval_covers(coins: rr.Coins) -> None:
    """2000 seeded surveys of 1000 devices: the mean estimate is the true rate (within 4 standard errors
    of the mean), the spread matches the reported standard error, and the 95% CI covers ~95% of the time."""
    rng = np.random.default_rng(12345)
    true_rate, n, trials = 0.3, 1000, 2000
    truth = rng.random((trials, n)) < true_rate
    first = rng.random((trials, n)) < coins.p_first
    second = rng.random((trials, n)) < coins.p_second
    answers = np.where(first, truth, second)
    estimates = [rr.estimate(int(y), n, coins) for y in answers.sum(axis=1)]
    rates = np.array([e["rate"] for e in estimates])
    sd = rates.std()
    assert abs(rates.mean() - true_rate) < 4 * sd / math.sqrt(trials)
    assert np.mean([e["stderr"] for e in estimates]) == pytest.approx(sd, rel=0.1)
    z = 1.959964
    covered = np.mean([abs(e["rate"] - true_rate) <= z * e["stderr"] for e in estimates])
    assert 0.93 <= covered <= 0.97
    # the device-side respond() draws from the same distribution
    r = random.Random(7)
    yes = sum(rr.respond(i < 300, coins, r) for i in range(1000) for _ in range(20))
    assert abs(yes / 20000 - (0.3 * coins.p_yes_true + 0.7 * coins.p_yes_false)) < 0.02


def test_devices_report_through_the_server(server_factory) -> None:  # noqa: F811
    srv: ServerProcess = server_factory("--rr-p-first", "0.5", "--rr-p-second", "0.5")
    rng = random.Random(3)
    n, true_rate = 400, 0.25
    reporter = TelemetryReporter(rng=rng)
    apis = []
    sent_yes = 0
    shared = httpx.Client(base_url=srv.url, timeout=30.0)
    for i in range(n):
        api = ServerAPI(srv.url, client=shared)
        api.register()
        apis.append(api)
        facts = SessionFacts()
        if i < n * true_rate:
            facts.note("suggestion_accepted")
        answer = reporter.report(api, facts.take())
        assert answer is not None
        sent_yes += answer["sent"]["suggestion_accepted"]
        assert set(answer["sent"]) == {"suggestion_accepted", "personal_model_used"}
    # one answer per question per period
    with pytest.raises(ServerError) as exc:
        apis[0].post_json("/v1/telemetry/rr", {"coins": {"p_first": 0.5, "p_second": 0.5},
                                               "answers": {"suggestion_accepted": True}})
    assert exc.value.reason == "already_reported"
    # other coins than the server's are refused
    with pytest.raises(ServerError) as exc:
        apis[1].post_json("/v1/telemetry/rr", {"coins": {"p_first": 0.9, "p_second": 0.5},
                                               "answers": {"personal_model_used": True}})
    assert exc.value.reason == "coins_mismatch"
    summary = srv.admin_get("/v1/admin/telemetry")
    q = summary["questions"]["suggestion_accepted"]
    assert q["reports"] == n and q["yes"] == sent_yes
    assert q["rate"] == pytest.approx(2 * sent_yes / n - 0.5)
    assert q["ci_low"] <= true_rate <= q["ci_high"]  # seeded: holds for this draw
    assert summary["local_epsilon"] == pytest.approx(math.log(3))
    page = srv.admin().get("/status").text
    assert "Telemetry (randomized response)" in page and "suggestion_accepted" in page
    # the database holds counts, never an individual answer
    rows = srv.admin_get("/v1/admin/status")["telemetry"]["questions"]["suggestion_accepted"]
    assert rows["reports"] == n
    shared.close()


def test_device_refuses_coins_that_reveal_too_much(server_factory) -> None:  # noqa: F811
    srv: ServerProcess = server_factory("--rr-p-first", "0.9", "--rr-p-second", "0.5")
    api = ServerAPI(srv.url)
    api.register()
    reporter = TelemetryReporter()  # default limit: ln 3
    assert reporter.report(api, {"suggestion_accepted": True}) is None
    assert reporter.last["reason"] == "coins_too_revealing" and reporter.last["local_epsilon"] > math.log(3)
    assert srv.admin_get("/v1/admin/telemetry")["questions"]["suggestion_accepted"]["reports"] == 0
    api.close()
