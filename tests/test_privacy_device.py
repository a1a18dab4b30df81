"""DeviceClients (real local training, clipping, distributed DP noise) in a SecAgg round against a real
server: one device drops out during training, after it shared its keys; the round still closes with
the others' exact secure sum, the server's accountant reports epsilon for the sum, and the requests
the devices sent carry no text, and nothing of the personal typing cache (its n-gram counts)."""
from __future__ import annotations

import threading

import pytest

from device_app.client import ClientSettings, DeviceClient
from device_app.eligibility import EligibilitySettings
from device_app.testing import SAMPLE_MESSAGES, vocab_for
from models.config import preset
from tests.server_fixtures import ServerProcess

N = 4  # admitted: ceil(goal 3 * over_admit 1.3333); the round closes at its goal of 3 masked inputs


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("privdev")
    vocab = vocab_for(SAMPLE_MESSAGES, size=preset("tiny").vocab_size - 4)
    vocab.save(root / "vocab.json")
    srv = ServerProcess(root / "srv", [
        "--init-preset", "tiny", "--vocab-file", str(root / "vocab.json"), "--round-goal", "3", "--min-count", "3",
        "--over-admit", "1.3333", "--secure-aggregation", "secagg", "--dp-mode", "distributed", "--clip-norm", "0.5",
        "--noise-multiplier", "0.5", "--deadline-s", "120", "--secagg-stage-s", "90", "--tick-s", "0.05",
        "--allow-noisy-dp"],
        root / "srv.log").start()
    bodies: list[bytes] = []
    lock = threading.Lock()

    def record(request) -> None:
        with lock:
            bodies.append(request.read())

    clients = []
    for i in range(N):
        settings = ClientSettings(eligibility=EligibilitySettings(idle_after_s=0.0, use_battery_sensor=False),
                                  auto_personalize=False)
        c = DeviceClient(root / f"dev{i}", srv.url, settings=settings, initial_bundle=False, seed=i,
                         on_request=record)
        for m in SAMPLE_MESSAGES:
            c.commit(m, typed_now=False)
        c.sync()
        c.suggest("see you to")  # builds the personal typing cache of the messages above, as the keyboard would
        clients.append(c)
    # Check every device in first (so all are in the cohort), then let them run the round concurrently.
    outcomes: list = [None] * N

    def run(i: int) -> None:
        outcomes[i] = clients[i].participate_once(should_drop=(lambda: True) if i == 2 else None, force=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    out = {"srv": srv, "clients": clients, "outcomes": outcomes, "bodies": bodies}
    yield out
    for c in clients:
        c.close()
    srv.stop()


def test_round_closes_with_the_survivors_secure_sum(session) -> None:
    srv, outcomes = session["srv"], session["outcomes"]
    statuses = [o.status for o in outcomes]
    assert statuses.count("uploaded") == 3 and statuses[2] == "cancelled", [str(o) for o in outcomes]
    rid = outcomes[0].round_id
    r = srv.wait_round(rid, timeout=60)
    assert r["state"] == "closed", r
    sa = r["secure_aggregation"]
    assert sa["n_u1"] == N and sa["n_u2"] == N and sa["n_u3"] == 3 and sa["dropped_after_sharing"] == 1
    assert r["outcome"]["aggregated"] == 3 and r["epsilon"] is not None and r["epsilon"] > 0
    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["secure_aggregation"] == "secagg" and privacy["dp_mode"] == "distributed"
    assert privacy["epsilon"] == pytest.approx(r["epsilon"])
    # one device's own upload alone would carry only sigma / sqrt(min_count): far weaker, reported beside it
    assert privacy["local_epsilon_per_upload"] > privacy["epsilon"]
    log = [e for e in session["clients"][0].sent_log() if e.get("type") == "update"]
    assert log and log[-1]["secure_aggregation"] == "secagg" and log[-1]["status"] == "accepted"
    assert log[-1]["noise_stddev"] == pytest.approx(0.5 * 0.5 / 3 ** 0.5)


def test_no_text_leaves_the_devices(session) -> None:
    words = {w for m in SAMPLE_MESSAGES for w in m.replace("?", " ").replace("!", " ").split() if len(w) >= 6}
    for body in session["bodies"]:
        text = body.decode("latin-1").lower()
        for w in words:
            assert w not in text, f"{w!r} was sent"
    # the masked uploads are integers mod 2^32, not a wire-format float delta
    magics = {b[:4] for b in session["bodies"] if b}
    assert b"FKSA" in magics and b"FKW1" not in magics


def test_the_typing_cache_never_leaves_the_devices(session) -> None:
    """Each device counted its messages' n-grams for suggestions; no request carries them: not as
    integers of any width, not as JSON numbers, not as the counts, and nothing names the cache."""
    import json

    import numpy as np

    bodies = session["bodies"]
    assert bodies
    for c in session["clients"]:
        trigrams = c.models.typing_cache.counts(3)
        assert c.models.typing_cache.built and len(trigrams) > 20  # the cache exists and holds the user's text
        for gram, count in trigrams.items():
            needles = [np.asarray(gram, dtype).tobytes() for dtype in ("<i2", "<i4", "<i8", "<f4")]
            needles += [json.dumps(list(gram)).encode()[:-1], ",".join(map(str, gram)).encode() + b","]
            needles.append(json.dumps({" ".join(map(str, gram)): count}).encode()[1:-1])
            for body in bodies:
                for needle in needles:
                    assert needle not in body, f"trigram {gram} of the typing cache was sent"
    for body in bodies:
        low = body.lower()
        assert b"ngram" not in low and b"typing_cache" not in low and b'"cache' not in low
