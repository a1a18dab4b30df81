"""Crash safety and concurrency: kill -9 mid-round, restart, resume; many parallel uploads."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from models import wire
from server.services import build_services
from server.bootstrap import from_preset
from server.config import ServerConfig
from tests.server_fixtures import (  # noqa: F401  (server_factory is a fixture)
    ELIGIBLE, TINY, assert_weights_equal, dyadic_delta, encode_delta, expected_mean, server_factory,
)


def test_kill9_mid_round_resumes_with_every_accepted_update(server_factory):
    srv = server_factory("--round-goal", "12", "--min-count", "12", "--over-admit", "1.0", "--deadline-s", "300")
    _, base = srv.model()
    devices = [srv.device() for _ in range(12)]
    tasks = [d.task() for d in devices]
    rid = tasks[0]["round_id"]
    deltas = [dyadic_delta(100 + i) for i in range(12)]
    counts = [3 + i for i in range(12)]
    bodies = [encode_delta(dl, 1, num_examples=n) for dl, n in zip(deltas, counts)]
    answers = {}
    for i in range(4):  # accepted before anything goes wrong
        r = devices[i].upload(rid, bodies[i])
        assert r.status_code == 200
        answers[i] = r.json()

    # in flight when the server is killed: three uploads stuck half-way through their bodies, and three
    # complete uploads racing the kill
    ok_before_kill = {}
    halfway = [threading.Event() for _ in range(3)]
    release = threading.Event()

    def slow_body(body: bytes, reached: threading.Event):
        yield body[: len(body) // 2]
        reached.set()
        release.wait(30)
        yield body[len(body) // 2 :]

    def send(i: int) -> None:
        try:
            if i < 7:
                r = devices[i].client.post(f"/v1/rounds/{rid}/update", content=slow_body(bodies[i], halfway[i - 4]),
                                           headers={"Content-Length": str(len(bodies[i]))})
            else:
                r = devices[i].upload(rid, bodies[i])
            if r.status_code == 200:
                ok_before_kill[i] = r.json()
        except httpx.TransportError:
            pass

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4, 10)]
    for t in threads:
        t.start()
    for event in halfway:
        assert event.wait(30)
    time.sleep(0.02)
    srv.kill9()
    release.set()
    for t in threads:
        t.join()
    assert not any(i < 7 for i in ok_before_kill)

    srv.start()  # same data dir, same SQLite file
    for d in devices:
        d.client.base_url = srv.url
    rnd = srv.round(rid)
    print(f"racing the kill: 3 complete uploads, {len(ok_before_kill)} answered 200; "
          f"{rnd['accepted'] - 4} accepted after the restart")
    assert rnd["state"] == "open"
    assert rnd["accepted"] >= 4 + len(ok_before_kill)  # every 2xx survived the kill
    assert rnd["accepted"] <= 4 + 3  # no half-received upload was accepted
    # retries of accepted payloads get their original answers; a different payload is a duplicate
    for i, answer in {**answers, **ok_before_kill}.items():
        again = devices[i].upload(rid, bodies[i])
        assert again.status_code == 200 and again.json() == answer
    dup = devices[0].upload(rid, bodies[1])
    assert dup.json()["error"] == "duplicate_upload"
    # the half-sent uploads left nothing behind: these devices may even send a different update now
    for i in range(4, 7):
        deltas[i] = dyadic_delta(500 + i)
        bodies[i] = encode_delta(deltas[i], 1, num_examples=counts[i])
    # an admitted device checking in again gets the same task after the restart
    assert devices[11].checkin()["task"]["round_id"] == rid
    # the interrupted uploads are retried (accepted now, or answered as already accepted), then the rest
    for i in range(4, 12):
        r = devices[i].upload(rid, bodies[i])
        assert r.status_code == 200, r.text
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed" and rnd["accepted"] == 12
    _, weights = srv.model()
    assert_weights_equal(weights, expected_mean(base, deltas, counts))
    assert not any((srv.data_dir / "updates").rglob("*")), "individual updates are deleted after aggregation"


def test_restart_during_aggregation_reaggregates_the_same_result(tmp_path):
    """A round that reached its goal but whose aggregation never committed is aggregated at the next start."""
    config = ServerConfig(data_dir=str(tmp_path / "d"), admin_token="x", round_goal=2, min_count=2, deadline_s=60)
    manager = build_services(config).manager
    model_config, vocab, weights, info = from_preset("tiny", None, 0)
    manager.models.initialize(model_config, vocab, weights, info)
    manager.recover()  # no worker thread: nothing aggregates in this "process"
    devices = []
    for _ in range(2):
        device_id = "d_" + str(len(devices))
        with manager.db.write():
            manager.db.add_device(device_id, device_id + "-hash")
        devices.append(device_id)
    deltas = [dyadic_delta(200 + i) for i in range(2)]
    for device_id, delta in zip(devices, deltas):
        task = manager.checkin(device_id, ELIGIBLE)["task"]
        manager.submit_update(device_id, task["round_id"], encode_delta(delta, 1, num_examples=2))
    rid = task["round_id"]
    assert manager.db.get_round(rid).state == "aggregating"
    # "crash": drop the manager without aggregating; a new process opens the same data dir
    restarted = build_services(ServerConfig(data_dir=str(tmp_path / "d"), admin_token="x", round_goal=2,
                                            min_count=2, deadline_s=60)).manager
    restarted.recover()
    restarted.tick()
    rnd = restarted.db.get_round(rid)
    assert rnd.state == "closed" and rnd.result_version == 2
    blob, _ = restarted.models.model_blob(2)
    got = wire.decode(blob, TINY).tensors
    assert_weights_equal(got, expected_mean(weights, deltas, [2, 2]))


def test_concurrent_uploads_never_corrupt_the_aggregate(server_factory):
    n = 32
    srv = server_factory("--round-goal", str(n), "--min-count", str(n), "--over-admit", "1.0", "--deadline-s", "300")
    _, base = srv.model()
    devices = [srv.device() for _ in range(n)]
    rid = [d.task() for d in devices][0]["round_id"]
    deltas = [dyadic_delta(300 + i) for i in range(n)]
    counts = [1 + (i * 7) % 50 for i in range(n)]
    bodies = [encode_delta(dl, 1, num_examples=c) for dl, c in zip(deltas, counts)]
    # every device sends its update twice at the same time (a client retry racing the original)
    jobs = [i for i in range(n) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda i: (i, devices[i].upload(rid, bodies[i])), jobs))
    by_device: dict[int, list] = {}
    for i, r in results:
        assert r.status_code == 200, r.text
        by_device.setdefault(i, []).append(r.json())
    for i, answers in by_device.items():
        assert answers[0] == answers[1]
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed" and rnd["accepted"] == n
    _, weights = srv.model()
    assert_weights_equal(weights, expected_mean(base, deltas, counts))
    metrics = srv.admin().get("/metrics").text
    assert f'fk_uploads_total{{result="accepted"}} {n}' in metrics
    assert f'fk_uploads_total{{result="repeat"}} {n}' in metrics
