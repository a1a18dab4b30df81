"""The store's contract on both engines: server.db.Db and the SecAgg, Paillier, telemetry and DP-FTRL stores
give the same answers on SQLite and on PostgreSQL (a throwaway cluster: tests/pg_fixture.py), and
`with db.write():` means the same on both: one writer at a time, all or nothing, the writing thread sees its
own rows, other threads see them only once committed and are never held up by the open transaction.
The engine-specific SQL rewriting (server/db_dialect.py) is checked on its own at the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from models import paillier_pack as pp
from models import secagg_math as sm
from server.db import Db
from server.db_dialect import StoreUnavailable, translate, translate_schema
from server.db_url import redact_url, scrub
from tests.pg_fixture import pg_url, shared_cluster  # noqa: F401 - pg_url is a fixture

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"goal": 2, "min_count": 1, "max_admitted": 3, "deadline_s": 60.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a Db opens: a SQLite file, or a fresh PostgreSQL database."""
    return tmp_path / "store.sqlite3" if request.param == "sqlite" else shared_cluster().create_database()


@pytest.fixture
def db(target: str | Path) -> Iterator[Db]:
    d = Db(target)
    yield d
    d.close()


def _round(db: Db, **params) -> int:
    with db.write():
        return db.create_round(kind="train", base_version=0, seed=2**62 + 7, params={**PARAMS, **params})


# ---------------------------------------------------------------------- Db's tables
def test_meta_devices_and_blocks(db: Db) -> None:
    assert db.engine in ("sqlite", "postgresql")
    assert db.get_meta("schema_version") == 1 and db.get_meta("nope", 5) == 5
    with db.write():
        db.set_meta("global_version", {"v": 3})
        db.set_meta("global_version", {"v": 4})  # upsert
        db.add_device("d1", "h1")
        db.add_device("d2", "h2")
        db.touch_device("d1", 1000.0)
        db.set_device_block("d2", "banned", "spam")
    assert db.get_meta("global_version") == {"v": 4}
    assert db.device_by_token_hash("h1")["id"] == "d1" and db.device_by_token_hash("zz") is None
    assert db.count_devices() == 2 and db.count_devices_in_good_standing() == 1
    assert db.count_active_devices(999.0) == 1 and db.count_active_devices(1001.0) == 0
    assert db.get_device("d2")["state"] == "banned" and db.get_device("d2")["reason"] == "spam"
    assert db.device_blocks() == {"d2": "banned"}
    with db.write():
        db.set_device_block("d2", "revoked", "lost")  # upsert replaces
    assert db.get_device("d2")["state"] == "revoked"
    with db.write():
        db.set_device_block("d2", None)
    assert db.device_blocks() == {} and db.get_device("d2")["state"] is None


def test_models(db: Db) -> None:
    with db.write():
        db.add_model(1, source="init", file="models/v1.bin", sha256="a", size=10, info={"k": 1}, was_global=True)
        db.add_model(2, source="round", file="models/v2.bin", sha256="b", size=11, parent_version=1, round_id=1,
                     opt_state_file="opt/v2.npz")
        db.update_model(2, candidate_state="released", was_global=True, info={"eval": {"recall": 0.5}})
    m = db.get_model(2)
    assert m["info"] == {"eval": {"recall": 0.5}} and m["was_global"] is True and m["parent_version"] == 1
    assert db.get_model(1)["info"] == {"k": 1} and db.get_model(3) is None
    assert [x["version"] for x in db.list_models()] == [1, 2] and db.max_version() == 2
    assert db.live_model_files() == {"models/v1.bin", "models/v2.bin", "opt/v2.npz"}


def test_rounds_and_privacy_ledger_queries(db: Db) -> None:
    from server.privacy_account import GAUSSIAN_ROUNDS_SQL

    a, b, c = _round(db), _round(db, dp_mode="ftrl"), _round(db)
    assert b == a + 1 and c == b + 1  # ids from the engine, increasing
    assert db.get_round(a).seed == 2**62 + 7  # 64-bit integers survive
    with db.write():
        db.update_round(a, state="closed", noise_multiplier=1.5, sampling_prob=0.25, closed_at=time.time(),
                        outcome={"reason": "goal"})
        db.update_round(b, state="closed", noise_multiplier=0.7, sampling_prob=1.0)
        db.admit(c, "d1", 1.0)
        db.admit(c, "d2", 2.0)
    assert db.get_round(a).state == "closed" and db.active_round("train").id == c
    assert [r.id for r in db.rounds_in_state("closed")] == [a, b]
    assert [r.id for r in db.rounds_in_state("open", "eval")] == []
    assert db.dp_rounds() == [(1.5, 0.25)] and db.dp_rounds(ftrl=True) == [(0.7, 1.0)]
    assert [r["noise_multiplier"] for r in db.all(GAUSSIAN_ROUNDS_SQL)] == [1.5]
    assert db.round_state_counts() == {("train", "closed"): 2, ("train", "open"): 1}
    listed = db.list_rounds(limit=2, kind="train")
    assert [r.id for r in listed] == [c, b]
    assert db.list_rounds(before=b)[0].id == a
    assert db.is_admitted(c, "d1") and not db.is_admitted(c, "d3") and db.count_admitted(c) == 2


def test_updates_and_eval_reports(db: Db) -> None:
    rid = _round(db)
    with db.write():
        s1 = db.add_update(round_id=rid, device_id="d1", payload_sha256="x", file="u/1", num_examples=5, weight=5.0,
                           norm=0.5, dtype="float32", metrics={"loss": 1.0}, received_at=1.0)
        s2 = db.add_update(round_id=rid, device_id="d2", payload_sha256="y", file="u/2", num_examples=7, weight=7.0,
                           norm=0.25, dtype="int8", metrics={}, received_at=2.0)
        e1 = db.add_eval_report(round_id=rid, device_id="d1", payload_sha256="z", report={"recall": 0.3},
                                received_at=3.0)
    assert s2 > s1 and e1 >= 1
    assert db.get_update(rid, "d2")["dtype"] == "int8" and json.loads(db.get_update(rid, "d1")["metrics"]) == {"loss": 1.0}
    assert [u["device_id"] for u in db.list_updates(rid)] == ["d1", "d2"]
    assert db.count_updates(rid) == 2 and db.count_participations() == 2
    assert db.live_update_files() == {"u/1", "u/2"}
    assert db.list_eval_reports(rid)[0]["report"] == {"recall": 0.3} and db.count_eval_reports(rid) == 1
    assert db.get_eval_report(rid, "d1")["payload_sha256"] == "z"
    with db.write():
        db.delete_update(rid, "d2")
        db.clear_update_files(rid)
    assert db.count_updates(rid) == 1 and db.live_update_files() == set()
    listed = db.list_rounds()[0]
    assert (listed.id, listed.n_admitted, listed.n_updates, listed.n_reports) == (rid, 0, 1, 1)


# ---------------------------------------------------------------------- transactions
def test_write_is_all_or_nothing_and_required(db: Db) -> None:
    with pytest.raises(RuntimeError, match="inside db.write"):
        db.add_device("d0", "h0")
    with pytest.raises(ZeroDivisionError):
        with db.write():
            db.add_device("d1", "h1")
            with db.write():  # nested: joins the outer transaction
                db.add_device("d2", "h2")
            1 / 0
    assert db.count_devices() == 0
    with db.write():
        db.add_device("d1", "h1")
        with db.write():
            db.add_device("d2", "h2")
    assert db.count_devices() == 2
    # a failed statement rolls the whole transaction back and leaves the writer usable
    with pytest.raises(Exception):
        with db.write():
            db.add_device("d3", "h3")
            db.add_device("d1", "h-dup")  # primary key taken
    assert db.count_devices() == 2
    with db.write():
        db.add_device("d3", "h3")
    assert db.count_devices() == 3


def test_readers_run_beside_an_open_write_and_see_only_commits(db: Db) -> None:
    rid = _round(db)
    inside, release, seen_inside = threading.Event(), threading.Event(), {}

    def writer() -> None:
        with db.write():
            db.update_round(rid, state="aggregating")
            db.add_device("d1", "h1")
            seen_inside["round"] = db.get_round(rid).state  # the writer reads its own uncommitted rows
            seen_inside["devices"] = db.count_devices()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert inside.wait(10)
    started = time.monotonic()
    results: list[tuple[int, str]] = []

    def reader() -> None:
        results.append((db.count_devices(), db.get_round(rid).state))

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(10)
    assert time.monotonic() - started < 5  # never waited for the writer
    assert results == [(0, "open")] * 4  # nothing uncommitted leaks, and no stale value was cached by them
    release.set()
    t.join(10)
    assert seen_inside == {"round": "aggregating", "devices": 1}
    assert db.count_devices() == 1 and db.get_round(rid).state == "aggregating"
    # a reader thread that ended gave its connection back
    r = threading.Thread(target=reader)
    r.start()
    r.join(10)
    assert results[-1] == (1, "aggregating")


def test_concurrent_writers_are_serialised_and_all_land(db: Db) -> None:
    rid = _round(db)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                with db.write():
                    n = db.count_admitted(rid)  # read-modify-write: only safe with one writer at a time
                    db.admit(rid, f"w{i}-{j}", float(n))
                    db.set_meta("last", n + 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert db.count_admitted(rid) == 40 and db.get_meta("last") == 40
    times = sorted(r["admitted_at"] for r in db.all("SELECT admitted_at FROM admissions WHERE round_id = ?", (rid,)))
    assert times == [float(k) for k in range(40)]  # each writer saw every earlier commit


def test_one_writer_at_a_time_across_two_stores_on_one_database(target: str | Path) -> None:
    """Two Db objects on one database (as two server processes would be): a write waits for the other's commit
    (SQLite: the file's write lock; PostgreSQL: the transaction's advisory lock), and then sees its rows."""
    first, second = Db(target), Db(target)
    try:
        holding, release, order = threading.Event(), threading.Event(), []

        def hold() -> None:
            with first.write():
                first.add_device("d1", "h1")
                holding.set()
                release.wait(10)
                order.append("first commits")

        t = threading.Thread(target=hold)
        t.start()
        assert holding.wait(10)
        threading.Timer(0.5, release.set).start()
        with second.write():
            order.append("second writes")
            assert second.count_devices() == 1  # the other's commit is visible to the writer that waited
            second.add_device("d2", "h2")
        t.join(10)
        assert order == ["first commits", "second writes"] and first.count_devices() == 2
    finally:
        first.close()
        second.close()


def test_reopening_keeps_rows_and_the_schema(target: str | Path) -> None:
    first = Db(target)
    rid = _round(first)
    first.close()
    again = Db(target)  # CREATE IF NOT EXISTS again: nothing lost
    assert again.get_round(rid).id == rid and again.get_meta("schema_version") == 1
    again.close()


# ---------------------------------------------------------------------- the services' stores
def test_secagg_store(db: Db) -> None:
    from server.secagg.store import SecAggStore, in_rel

    store = SecAggStore(db)
    rid = _round(db, secure_aggregation="secagg")
    q = sm.choose_quantization(1.0, 0.0, 100, 10)
    with db.write():
        store.create(rid, q, 0, 1.0)
        store.create(rid, q, 0, 2.0)  # INSERT OR IGNORE: the first row stays
    state = store.state(rid)
    assert state.stage == "advertise" and state.quantization == q and state.info["stages"]["advertise"]["opened"] == 1.0
    with db.write():
        store.update(rid, stage="share", u1=["a", "b", "c"], threshold=2)
        store.add_offenders(rid, [{"device_id": "c", "stage": "share", "reason": "bad"}])
        store.add_offenders(rid, [{"device_id": "c", "stage": "share", "reason": "bad"}])  # idempotent
        for d in "abc":
            store.add_identity(d, f"pk-{d}", 1.0)
            store.add_keys(rid, d, f"c-{d}", f"s-{d}", f"sig-{d}")
        sig, ct = bytes(range(64)), b"\x00\xff" * 40  # raw bytes: BLOB / BYTEA
        store.add_shares(rid, "a", [("b", ct, sig), ("c", ct[::-1], sig)], "commit-a", "sha-a")
        store.add_signature(rid, "a", "cons-a")
        store.add_unmask(rid, "a", {"b": "1"}, {"c": "2"}, "sha-u", pair_seeds={"c": "p"})
        store.add_dropout(rid, "c", "share", "timeout")
        store.add_dropout(rid, "c", "masked", "later")  # the first report counts
        db.add_update(round_id=rid, device_id="a", payload_sha256="f" * 64, file=None, num_examples=1, weight=1.0,
                      norm=0.0, dtype="int64", metrics={}, received_at=1.0)
    state = store.state(rid)
    assert state.stage == "share" and state.u1 == ["a", "b", "c"] and state.threshold == 2
    assert [o["device_id"] for o in state.info["offenders"]] == ["c"]
    assert store.identity("a")["public_key"] == "pk-a" and store.identities_of_advertisers(rid) == {
        d: f"pk-{d}" for d in "abc"}
    assert store.keys_of(rid, "b") == {"c_pk": "c-b", "s_pk": "s-b"} and store.count_keys(rid) == 3
    assert sorted(store.key_owners(rid, ["c-a", "s-c"])) == ["a", "c"] and set(store.all_keys(rid)) == set("abc")
    assert sorted(store.advertisers(rid)) == ["a", "b", "c"]
    shares = store.shares_by_sender(rid)
    assert {s["recipient"]: bytes(s["ct"]) for s in shares} == {"b": sig + ct, "c": sig + ct[::-1]}
    assert store.commitment_sha(rid, "a") == "sha-a" and store.commitments(rid) == {"a": "commit-a"}
    assert store.sharers(rid) == ["a"] and store.count_commitments(rid) == 1
    assert store.signature_of(rid, "a") == "cons-a" and store.signatures(rid) == [{"device_id": "a", "signature": "cons-a"}]
    assert store.count_signatures(rid) == 1 and store.unmask_sha(rid, "a") == "sha-u" and store.count_unmask(rid) == 1
    assert store.unmask_bodies(rid) == {"a": {"b": {"b": "1"}, "s": {"c": "2"}, "p": {"c": "p"}}}
    assert store.dropouts(rid) == {"c": "share"}
    with db.write():
        store.update(rid, sum_file="secagg/sum.npy")
    assert store.live_files() == {"secagg/sum.npy", in_rel(rid, "a", "f" * 64)}
    assert [r["round_id"] for r in store.uncleaned()] == [rid]
    with db.write():
        store.delete_stage_rows(rid)
        store.update(rid, cleaned=True)  # a bool into an integer flag column
    assert store.count_keys(rid) == 0 and store.shares_by_sender(rid) == [] and store.uncleaned() == []
    assert store.state(rid).cleaned is True


def test_paillier_store(db: Db) -> None:
    from server.paillier.store import PaillierStore

    store = PaillierStore(db)
    rid = _round(db, secure_aggregation="paillier")
    packing = pp.choose_packing(1.0, 0.0, 50, 10)
    store.create(rid, "key-1", packing)
    store.create(rid, "key-2", packing)  # ignored
    row = store.row(rid)
    assert row["key_id"] == "key-1" and row["packing"] == packing and row["info"] == {}
    with db.write():
        store.set_sum(rid, "paillier/sum", 3, {"n": 3})
    store.set_info(rid, {"n": 4})
    assert store.row(rid)["sum_count"] == 3 and store.row(rid)["info"] == {"n": 4}
    assert store.live_files() == {"paillier/sum"} and store.finished_with_sum() == []
    with db.write():
        db.update_round(rid, state="closed")
    assert store.finished_with_sum() == [rid]
    store.clear_sum(rid)
    assert store.live_files() == set() and store.finished_with_sum() == []


def test_telemetry_and_ftrl_stores(db: Db) -> None:
    from server.ftrl import SCHEMA as FTRL_SCHEMA
    from server.telemetry.store import TelemetryStore

    tele = TelemetryStore(db)
    with db.write():
        tele.add("d1", "q", 7, 0.5, 0.5, True)
        tele.add("d2", "q", 7, 0.5, 0.5, False)
        tele.add("d1", "q", 8, 0.5, 0.5, True)
        tele.add("d1", "r", 8, 0.75, 0.5, True)
    assert tele.reported("d1", "q", 7) and not tele.reported("d2", "q", 8)
    assert [(c["question"], c["p_first"], c["yes"], c["n"]) for c in tele.counts()] == [("q", 0.5, 2, 3),
                                                                                       ("r", 0.75, 1, 1)]
    with db.write():
        tele.forget_before(8)
    assert not tele.reported("d1", "q", 7) and tele.reported("d1", "q", 8)
    # DP-FTRL's participation rows (server/ftrl.py writes them with executemany + INSERT OR IGNORE)
    db.install_schema(FTRL_SCHEMA)
    sql = "INSERT OR IGNORE INTO ftrl_participation(device_id, leaf, round_id) VALUES (?, ?, ?)"
    with db.write():
        db.executemany(sql, [("d1", 1, 10), ("d2", 1, 10)])
        db.executemany(sql, [("d1", 1, 11), ("d1", 2, 12)])
    assert [r["leaf"] for r in db.all("SELECT leaf FROM ftrl_participation WHERE device_id = ? ORDER BY leaf",
                                      ("d1",))] == [1, 2]


# ---------------------------------------------------------------------- PostgreSQL specifics
def test_postgres_translation() -> None:
    assert translate("SELECT * FROM t WHERE a = ? AND b IN (?, ?)") == "SELECT * FROM t WHERE a = %s AND b IN (%s, %s)"
    assert translate("INSERT OR IGNORE INTO t(a) VALUES (?)") == "INSERT INTO t(a) VALUES (%s) ON CONFLICT DO NOTHING"
    assert translate("SELECT 'a?b%' AS x WHERE y LIKE ?") == "SELECT 'a?b%%' AS x WHERE y LIKE %s"  # literals kept
    assert translate("SELECT COALESCE(json_extract(params, '$.dp_mode'), '') AS m") == (
        "SELECT COALESCE((params::jsonb ->> 'dp_mode'), '') AS m")
    with pytest.raises(ValueError, match="REPLACE"):
        translate("INSERT OR REPLACE INTO t(a) VALUES (?)")
    ddl = translate_schema("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, x REAL, b BLOB, n INTEGER)")
    assert ddl == ("CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, x DOUBLE PRECISION,"
                   " b BYTEA, n BIGINT)")
    assert redact_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("postgresql://u@/db?host=/tmp/x") == "postgresql://u@/db?host=/tmp/x"
    broken = "postgresql://u:pw@[::1/x"  # does not parse: nothing of it is shown, and errors quoting it are scrubbed
    assert redact_url(broken) == "postgresql://(unparsable URL)"
    assert scrub(f'bad URI: "{broken}"', broken) == 'bad URI: "postgresql://u:***@[::1/x"'


def test_unreachable_postgres_is_a_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://nobody:pw@/nodb?host={tmp_path}"  # no server listens there
    with pytest.raises(StoreUnavailable, match=r"cannot connect to PostgreSQL at postgresql://nobody:\*\*\*@"):
        Db(url)
    # and the server says so at start-up, in one line, without a traceback
    done = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "d"), "--admin-token", "t",
                           "--open-registration", "--database", url], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "python -m server: cannot connect to PostgreSQL at postgresql://nobody:***@" in done.stderr
    assert "Traceback" not in done.stderr and "pw@" not in done.stderr
    bad = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "d"), "--database",
                          "mysql://x/y"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "database must be a postgresql:// URL" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------- the server on PostgreSQL, end to end
def test_server_on_postgres_runs_a_plain_round_and_restarts_from_its_rows(tmp_path: Path, pg_url: str) -> None:
    import psycopg

    from tests.server_fixtures import (ELIGIBLE, ServerProcess, assert_weights_equal, dyadic_delta, encode_delta,
                                       expected_mean)

    url = pg_url
    srv = ServerProcess(tmp_path / "srv", ["--init-preset", "tiny", "--round-goal", "3", "--min-count", "3",
                                           "--deadline-s", "60", "--database", url], tmp_path / "srv.log").start()
    try:
        base_version, base = srv.model()
        devices = [srv.device() for _ in range(3)]
        rid = devices[0].task()["round_id"]
        assert all(d.task()["round_id"] == rid for d in devices[1:])
        deltas, counts = [dyadic_delta(i) for i in range(3)], [5, 17, 42]
        for d, delta, n in zip(devices, deltas, counts):
            r = d.upload(rid, encode_delta(delta, base_version, num_examples=n))
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        rnd = srv.wait_round(rid)
        assert rnd["state"] == "closed" and rnd["accepted"] == 3, rnd
        version, weights = srv.model()
        assert version == base_version + 1
        assert_weights_equal(weights, expected_mean(base, deltas, counts))
        assert srv.admin_get("/v1/admin/config")["database"] == url  # no password in it to hide
        srv.restart()  # everything but the blobs comes back from PostgreSQL
        assert srv.model()[0] == version and srv.round(rid)["accepted"] == 3
        for d in devices:
            d.close()
        r = httpx.post(srv.url + "/v1/checkin", headers={"Authorization": f"Bearer {devices[0].token}"},
                       json={"eligibility": ELIGIBLE, "model_version": version}, timeout=30)
        assert r.status_code == 200, r.text  # the device's token is still known
    finally:
        srv.stop()
    assert not (tmp_path / "srv" / "server.sqlite3").exists()  # no SQLite file beside the blobs
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT state, (SELECT COUNT(*) FROM updates) FROM rounds WHERE id = %s",
                            (rid,)).fetchone() == ("closed", 3)
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 3


def test_server_on_postgres_runs_a_secagg_round(tmp_path: Path, pg_url: str) -> None:
    import hashlib

    import numpy as np

    from device_app.privacy_sim import SimDevice, run_round
    from tests.server_fixtures import TINY, ServerProcess

    n, dim = 4, TINY.num_parameters()
    url = pg_url
    srv = ServerProcess(tmp_path / "srv", [
        "--init-preset", "tiny", "--round-goal", str(n), "--min-count", "3", "--over-admit", "1.0",
        "--secure-aggregation", "secagg", "--clip-norm", "1.0", "--deadline-s", "120", "--secagg-stage-s", "120",
        "--tick-s", "0.05", "--database", url], tmp_path / "srv.log").start()
    try:
        _, base = srv.model()
        rng = np.random.default_rng(5)
        deltas = []
        for _ in range(n):
            x = rng.normal(0.0, 0.004, dim)
            deltas.append((x * min(1.0, 0.9 / np.linalg.norm(x))).astype(np.float32))
        devs = [SimDevice(srv.url, seed=40 + i) for i in range(n)]
        results = run_round(devs, deltas)
        assert [x.status for x in results] == ["uploaded"] * n, [x.detail for x in results]
        rnd = srv.wait_round(devs[0].task.round_id, timeout=120)
        assert rnd["state"] == "closed", rnd
        info = rnd["secure_aggregation"]
        qsum = sum(x.quantized for x in results)
        assert info["n_u3"] == n
        assert info["sum_sha256"] == hashlib.sha256(qsum.astype("<i8").tobytes()).hexdigest()  # the exact sum
        _, new = srv.model(rnd["result_version"])
        flat = np.concatenate([b.reshape(-1) for b in base]).astype(np.float64)
        want = (flat + (qsum.astype(np.float64) / info["scale"]) / n).astype(np.float32)
        np.testing.assert_array_equal(np.concatenate([t.reshape(-1) for t in new]), want)
        for d in devs:
            d.close()
    finally:
        srv.stop()
