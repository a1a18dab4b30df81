"""Several server processes on one PostgreSQL database (--cluster, server/cluster.py; issue #17 item 3).

The locks on their own (the round lock serialises two stores' holders; the aggregator's lease passes on when
its session ends), the configuration's refusals, and end to end: a fleet split across two real server
processes, one of them SIGKILLed mid-round (the aggregator, or the API-only process), the round completing on
the survivor with every accepted update counted exactly once and downloads served by it.
"""
from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.cluster import LEADER_LOCK_KEY, ROUND_LOCK_KEY, ClusterLock, Leadership
from server.config import ServerConfig
from server.db import Db
from tests.pg_fixture import pg_url  # noqa: F401 - a fixture
from tests.server_fixtures import (ServerProcess, assert_weights_equal, dyadic_delta, encode_delta, expected_mean,
                                   wait_for)


def _waiting_on(url: str, key: int) -> int:
    """Sessions waiting (not granted) for the advisory lock `key` (pg_locks splits a bigint key in two)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                            " AND ((classid::bigint << 32) | objid::bigint) = %s", (key,)).fetchone()[0]


def test_the_round_lock_serialises_holders_in_two_stores(pg_url: str) -> None:
    a, b = Db(pg_url, shared=True), Db(pg_url, shared=True)
    lock_a, lock_b = ClusterLock(a), ClusterLock(b)
    got_b, order = threading.Event(), []
    try:
        with lock_a:
            with lock_a:  # re-entrant in its own process
                order.append("a")

                def take_b() -> None:
                    with lock_b:
                        order.append("b")
                        got_b.set()

                t = threading.Thread(target=take_b)
                t.start()
                wait_for(lambda: _waiting_on(pg_url, ROUND_LOCK_KEY) == 1, "the second store waiting for the lock")
                assert not got_b.is_set()
        got_b.wait(30)
        t.join(30)
        assert order == ["a", "b"]
    finally:
        lock_a.close()
        lock_b.close()
        a.close()
        b.close()


def test_the_aggregator_lease_passes_on_when_its_session_ends(pg_url: str, monkeypatch) -> None:
    import psycopg

    import server.cluster as cluster

    monkeypatch.setattr(cluster, "LEASE_CHECK_S", 0.0)  # check the session on every call
    a, b = Db(pg_url, shared=True), Db(pg_url, shared=True)
    first, second = Leadership(a), Leadership(b)
    try:
        assert first.held() and first.holds
        assert not second.held() and not second.holds
        # the holder's session ends as a SIGKILLed process's does: PostgreSQL drops its locks with it
        with psycopg.connect(pg_url, autocommit=True) as admin:
            pids = [r[0] for r in admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND ((classid::bigint << 32) | objid::bigint) = %s", (LEADER_LOCK_KEY,)).fetchall()]
            assert len(pids) == 1
            admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        wait_for(lambda: second.held(), "the lease to pass to the second store")
        assert not first.held()  # the old holder notices its session is gone
        second.release()
        wait_for(lambda: first.held(), "the lease to come back after release")
    finally:
        first.release()
        second.release()
        a.close()
        b.close()


def test_cluster_needs_postgres_and_no_secure_aggregation() -> None:
    with pytest.raises(ValueError, match="cluster needs a PostgreSQL --database"):
        ServerConfig(cluster=True).validate()
    with pytest.raises(ValueError, match="no secure aggregation"):
        ServerConfig(cluster=True, database="postgresql://x@/y", secure_aggregation="secagg").validate()
    ServerConfig(cluster=True, database="postgresql://x@/y").validate()


def _client(server: ServerProcess, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0)


def _role(server: ServerProcess) -> str:
    return httpx.get(server.url + "/healthz", timeout=10).json()["role"]


@pytest.mark.parametrize("victim", ["aggregator", "api"])
def test_a_fleet_on_two_processes_survives_a_sigkill_mid_round(tmp_path: Path, pg_url: str, victim: str) -> None:
    data = tmp_path / "data"
    common = ["--cluster", "--database", pg_url, "--round-goal", "6", "--min-count", "6", "--deadline-s", "300"]
    first = ServerProcess(data, ["--init-preset", "tiny", *common], tmp_path / "a.log", name="a").start()
    second = None
    try:
        second = ServerProcess(data, common, tmp_path / "b.log", name="b").start()
        assert _role(first) == "aggregator" and _role(second) == "api"  # the first to start holds the lease
        dead, survivor = (first, second) if victim == "aggregator" else (second, first)
        base_version, base = survivor.model()

        # half the fleet registers and checks in on each process: one round, one admission table
        on_dead = [dead.device() for _ in range(3)]
        on_survivor = [survivor.device() for _ in range(3)]
        rid = on_dead[0].task()["round_id"]
        assert all(d.task()["round_id"] == rid for d in on_dead[1:] + on_survivor)

        # a block set through one process holds on the other (the table is asked, not a copy)
        banned = survivor.device()
        assert dead.admin_post(f"/v1/admin/devices/{banned.id}/ban", json={"reason": "test"}).status_code == 200
        r = banned.client.post("/v1/checkin", json={"eligibility": {"charging": True, "unmetered": True, "idle": True}})
        assert (r.status_code, r.json()["error"]) == (403, "banned"), r.text

        deltas = [dyadic_delta(i) for i in range(6)]
        counts = [5, 17, 42, 8, 13, 21]
        bodies = [encode_delta(delta, base_version, num_examples=n) for delta, n in zip(deltas, counts)]
        devices = on_dead + on_survivor  # device i sends bodies[i]
        for i in (0, 1, 3, 4):
            r = devices[i].upload(rid, bodies[i])
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        assert survivor.round(rid)["state"] == "open"

        # SIGKILL with one more upload on its way to the doomed process: whether it committed is unknown
        in_flight: dict[str, object] = {}

        def send() -> None:
            try:
                in_flight["status"] = devices[2].upload(rid, bodies[2]).status_code
            except httpx.TransportError as exc:
                in_flight["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        dead.kill9()
        sender.join(60)

        # the dead process's devices move to the survivor and send again what they sent before: an accepted
        # update is never counted twice, and one that did not commit is accepted now
        for i in range(3):
            with _client(survivor, devices[i].token) as c:
                r = c.post(f"/v1/rounds/{rid}/update", content=bodies[i],
                           headers={"Content-Type": "application/octet-stream"})
                assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        r = devices[5].upload(rid, bodies[5])  # the goal
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text

        wait_for(lambda: _role(survivor) == "aggregator", "the survivor to hold the aggregator's lease")
        rnd = survivor.wait_round(rid, timeout=60)
        assert rnd["state"] == "closed" and rnd["accepted"] == 6, rnd
        rows = survivor.query("SELECT device_id FROM updates WHERE round_id = ?", (rid,))
        assert sorted(r["device_id"] for r in rows) == sorted(d.id for d in devices)  # each device once
        version, weights = survivor.model()  # downloads keep working from the survivor
        assert version == base_version + 1
        assert_weights_equal(weights, expected_mean(base, deltas, counts))  # exactly these six, each once
        for d in devices + [banned]:
            d.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_orphans_stay_while_another_server_process_may_be_writing_them(tmp_path: Path, pg_url: str) -> None:
    import os
    import time

    import psycopg

    from server.cluster import other_server_processes
    from server.store import Store

    store = Store(tmp_path)
    young = store.write_update(7, "d_young", [np.zeros(4, np.float32)])
    old = store.write_update(7, "d_old", [np.zeros(4, np.float32)])
    an_hour_ago = time.time() - 3600
    os.utime(store.path(old), (an_hour_ago, an_hour_ago))
    assert store.collect_garbage(set(), min_age_s=600) == [old]  # the young one may be another process's upload
    assert store.collect_garbage(set()) == [young]  # alone on the database: everything unreferenced goes

    db = Db(pg_url, shared=True)
    try:
        assert other_server_processes(db) == 0  # this process's own sessions do not count
        with psycopg.connect(pg_url, application_name="fk-server elsewhere 4242"):
            assert other_server_processes(db) == 1
        wait_for(lambda: other_server_processes(db) == 0, "the other session to end")
    finally:
        db.close()
