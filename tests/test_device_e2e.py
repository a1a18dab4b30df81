"""The headless device client end to end against the real server (a `python -m server`
subprocess on a loopback port), and the request-body privacy test.

One device session runs once per module (register, typing with suggestions, model download
with ETag, a federated round: check-in, train, clip, noise, upload; the round closes and the
new version is downloaded; a second round; personalization; a candidate evaluation; an upload
that waits out a network failure; the privacy report; the server going away). Every request
the client sends is recorded by its transport; the tests then check what happened and what
was sent.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_app.client import ClientSettings, DeviceClient
from device_app.eligibility import EligibilitySettings
from device_app.personalize import PersonalizationSettings
from device_app.testing import SAMPLE_MESSAGES, SwitchableTransport, vocab_for
from models import dp, wire
from models.bundle import load_bundle
from models.config import preset
from models.tokenizer import split_sentences, tokenize
from models.vocab import Vocabulary
from tests.server_fixtures import ADMIN_TOKEN, ServerProcess, server_factory  # noqa: F401 (fixture)

CLIP = 0.05
NOISE_MULTIPLIER = 0.1  # dp_mode local: each device adds N(0, (z * C)^2)
# The user's text: the sample messages plus lines only this user typed.
TYPED = [*SAMPLE_MESSAGES, "remember the quizzical aardvark password", "the aardvark sleeps under the quizzical bridge"]


def _record(requests: list[tuple[str, str, dict, bytes]], since: int = 0) -> list[tuple[str, str, dict, bytes]]:
    return requests[since:]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("e2e")
    vocab = vocab_for(TYPED, size=preset("tiny").vocab_size - 4)
    vocab.save(root / "vocab.json")
    srv = ServerProcess(
        root / "srv",
        ["--init-preset", "tiny", "--vocab-file", str(root / "vocab.json"), "--round-goal", "1", "--min-count", "1",
         "--dp-mode", "local", "--clip-norm", str(CLIP), "--noise-multiplier", str(NOISE_MULTIPLIER), "--allow-noisy-dp",
         "--candidate-eval-fraction", "1.0", "--eval-goal", "1", "--eval-min-count", "1", "--learning-rate", "0.5"],
        root / "srv.log",
    ).start()
    transport = SwitchableTransport()
    hooked: list[bytes] = []
    settings = ClientSettings(
        eligibility=EligibilitySettings(idle_after_s=0.0, use_battery_sensor=False),
        personalization=PersonalizationSettings(min_train_messages=5, epochs=4, lr=0.5),
    )
    client = DeviceClient(root / "device", srv.url, settings=settings, transport=transport, initial_bundle=False,
                          on_request=lambda r: hooked.append(r.read()), seed=0)
    out: dict[str, Any] = {"server_url": srv.url, "vocab": vocab, "transport": transport, "hooked": hooked,
                           "client": client, "outcomes": {}, "steps": {}}
    try:
        out["steps"]["registered"] = client.ensure_registered().device_id
        out["steps"]["first_sync"] = client.sync()
        out["steps"]["version_after_first_sync"] = client.models.global_version
        n = len(transport.requests)
        out["steps"]["second_sync"] = client.sync()
        out["second_sync_requests"] = _record(transport.requests, n)

        # The user types (every keystroke asks for suggestions) and sends messages, twice over.
        out["suggestions"] = []
        for _ in range(2):
            for message in TYPED:
                for i in range(1, len(message) + 1, 3):
                    client.note_keystroke()
                    out["suggestions"].append(client.suggest(message[:i]))
                client.commit(message)

        config = load_config(client)
        v1 = server_model(srv, 1, config)
        n = len(transport.requests)
        out["outcomes"]["round1"] = client.participate_once()
        out["round1_requests"] = _record(transport.requests, n)
        out["round1_state"] = srv.wait_round(out["outcomes"]["round1"].round_id or 1)
        out["v1"], out["v2"] = v1, server_model(srv, 2, config)
        out["steps"]["sync_after_round"] = client.sync()
        out["steps"]["version_after_round"] = client.models.global_version
        out["outcomes"]["round2"] = client.participate_once()
        srv.wait_round(out["outcomes"]["round2"].round_id or 2)

        out["gain"] = client.personalize()
        out["personal_weights"] = [np.array(w) for w in client.models.personal.weights] if client.models.personal else []

        # An admin stages a candidate; this device evaluates it against the global model.
        candidate = [w * 0.5 for w in server_model(srv, "current", config)]
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            blob = wire.encode(candidate, config, kind="weights", model_version=0)
            push = admin.post("/v1/admin/models", content=blob, headers={"Content-Type": "application/octet-stream"})
            assert push.status_code == 200, push.text
        out["outcomes"]["eval"] = client.participate_once()

        # The network fails during the upload: the update waits, then goes out when it is back.
        transport.offline, transport.fail_paths = True, ("/update",)
        out["outcomes"]["offline_round"] = client.participate_once()
        out["pending_while_offline"] = client.pending_uploads()
        out["connection_while_offline"] = client.connection
        transport.offline = False
        client.flush_pending()
        out["pending_after"] = client.pending_uploads()

        out["privacy"] = client.refresh_privacy()
        out["status"] = client.status()
        out["sent_log"] = client.sent_log()
        out["server_log"] = srv.log()
    finally:
        srv.stop()
    # The server is gone: the keyboard keeps working.
    out["down"] = {
        "suggest": client.suggest("see you to"),
        "participate": client.participate_once().status,
        "sync": client.sync(),
        "connection": client.connection,
    }
    yield out
    client.close()


def server_model(srv: ServerProcess, version: int | str, config) -> list[np.ndarray]:
    with srv.admin() as admin:
        r = admin.get(f"/v1/models/{version}")
        r.raise_for_status()
    return [np.array(t) for t in wire.decode(r.content, config, expected_kind="weights").tensors]


def load_config(client: DeviceClient):
    assert client.models.config is not None
    return client.models.config


def test_session_registers_downloads_and_joins_rounds(session: dict[str, Any]) -> None:
    s = session["steps"]
    assert s["registered"].startswith("d_")
    assert s["first_sync"] is True and s["version_after_first_sync"] == 1
    o = session["outcomes"]
    assert o["round1"].status == "uploaded", o["round1"]
    assert session["round1_state"]["state"] == "closed" and session["round1_state"]["result_version"] == 2
    # The new global version is downloaded and served.
    assert s["sync_after_round"] is True and s["version_after_round"] == 2
    assert o["round2"].status == "uploaded" and o["round2"].round_id == 2
    status = session["status"]
    assert status["contributions"] == 3  # rounds 1, 2 and the one that waited out the network failure
    assert status["last_round"]["round_id"] == o["offline_round"].round_id
    assert status["connection"] == "online"
    # Suggestions worked while typing.
    assert all(len(words) <= 3 for words in session["suggestions"])
    assert sum(1 for words in session["suggestions"] if words) > 0.9 * len(session["suggestions"])


def test_model_download_uses_the_etag(session: dict[str, Any]) -> None:
    assert session["steps"]["second_sync"] is False
    gets = [r for r in session["second_sync_requests"] if r[0] == "GET" and r[1].endswith("/v1/models/current")]
    assert len(gets) == 1 and gets[0][2].get("if-none-match")


def test_upload_is_the_clipped_noised_delta(session: dict[str, Any]) -> None:
    uploads = [r for r in session["round1_requests"] if r[0] == "POST" and r[1].endswith("/update")]
    assert len(uploads) == 1
    config = load_config(session["client"])
    payload = wire.decode(uploads[0][3], config, expected_kind="delta")
    assert payload.model_version == 1
    assert payload.metadata["num_examples"] > 0 and set(payload.metadata["metrics"]) >= {"loss_first_epoch"}
    entry = next(e for e in session["sent_log"] if e.get("round_id") == 1 and e["type"] == "update")
    stddev = NOISE_MULTIPLIER * CLIP
    assert entry["status"] == "accepted" and entry["clip_norm"] == pytest.approx(CLIP)
    assert entry["clipped"] and entry["norm_before_clip"] > CLIP
    assert entry["norm_after_clip"] == pytest.approx(CLIP, rel=1e-4)
    assert entry["noise_stddev"] == pytest.approx(stddev)
    # What went out is clip + noise: its norm is about sqrt(C^2 + dim * stddev^2).
    dim = config.num_parameters()
    assert dp.l2_norm(payload.tensors) == pytest.approx(np.sqrt(CLIP**2 + dim * stddev**2), rel=0.05)
    # The server's next version is the previous one plus exactly this delta (one update, mean, lr 1).
    for v1, v2, d in zip(session["v1"], session["v2"], payload.tensors):
        np.testing.assert_allclose(v2, v1 + d, rtol=1e-5, atol=1e-6)


def test_personalization_and_candidate_evaluation(session: dict[str, Any]) -> None:
    gain = session["gain"]
    assert gain is not None and {"global_top1", "personal_top1", "gain_top1"} <= set(gain)
    ev = session["outcomes"]["eval"]
    assert ev.status == "reported", ev
    versions = sorted(r["model_version"] for r in ev.info["results"])
    assert len(versions) == 2 and all(0 <= r["recall"] <= 1 for r in ev.info["results"])


def test_an_upload_waits_for_the_network(session: dict[str, Any]) -> None:
    o = session["outcomes"]["offline_round"]
    assert o.status == "pending", o
    assert session["pending_while_offline"] == [o.round_id]
    assert session["connection_while_offline"] == "offline"
    assert session["pending_after"] == []
    statuses = [e["status"] for e in session["sent_log"] if e.get("round_id") == o.round_id and e["type"] == "update"]
    assert statuses == ["pending", "accepted"]


def test_population_epsilon_is_reported(session: dict[str, Any]) -> None:
    assert session["privacy"]["dp_mode"] == "local"
    assert 0 < session["privacy"]["epsilon"]
    assert session["status"]["population_epsilon"] == session["privacy"]["epsilon"]


def test_offline_the_keyboard_keeps_working(session: dict[str, Any]) -> None:
    down = session["down"]
    assert down["suggest"] and all(w.startswith("to") for w in down["suggest"])
    assert down["participate"] == "offline" and down["sync"] is False and down["connection"] == "offline"


def test_pending_upload_is_dropped_with_its_round(session: dict[str, Any]) -> None:
    client: DeviceClient = session["client"]
    client.pending.save(999, b"not sent", {"type": "update", "round_id": 999, "deadline": time.time() - 1})
    assert 999 in client.pending_uploads()
    client.flush_pending()  # the server is down, but the round is over anyway: dropped, nothing sent
    assert 999 not in client.pending_uploads()
    assert client.sent_log()[-1]["status"] == "dropped"


# ---------------------------------------------------------------------- privacy


def _needles(vocab: Vocabulary) -> list[tuple[str, bytes]]:
    """Byte patterns that would reveal the typed text or its token sequences."""
    out: list[tuple[str, bytes]] = []
    for message in TYPED:
        out.append((f"text {message!r}", message.encode()))
        for word in tokenize(message):
            if len(word) >= 6:
                out.append((f"word {word!r}", word.encode()))
        for sentence in split_sentences(message):
            ids = [Vocabulary.BOS_ID, *vocab.encode(tokenize(sentence)), Vocabulary.EOS_ID]
            for i in range(len(ids) - 2):
                w = ids[i : i + 3]
                for dtype in ("<i4", "<i8", ">i4", "<i2", "<u2"):
                    out.append((f"ids {w} as {dtype}", np.array(w, dtype=dtype).tobytes()))
                out.append((f"ids {w} as text", ", ".join(map(str, w)).encode()))
                out.append((f"ids {w} as csv", ",".join(map(str, w)).encode()))
            for i in range(len(ids) - 5):
                out.append((f"ids {ids[i:i + 6]} as u8", bytes(ids[i : i + 6])))
    return out


def test_no_request_carries_the_typed_text_token_ids_or_personal_model(session: dict[str, Any]) -> None:
    requests = session["transport"].requests
    assert len(requests) >= 15
    kinds = {(m, r.split("/v1/")[-1].split("/")[0]) for m, r, _, _ in requests if "/v1/" in r}
    assert {("POST", "devices"), ("POST", "checkin"), ("POST", "rounds"), ("GET", "models"), ("GET", "model")} <= kinds
    # The event hook saw the same bodies (the injectable hook works as well as the transport).
    assert [b for *_, b in requests if b] == [b for b in session["hooked"] if b]

    needles = _needles(session["vocab"])
    personal = session["personal_weights"]
    assert personal, "the session built a personal model"
    for i, tensor in enumerate(personal):
        needles.append((f"personal tensor {i}", np.ascontiguousarray(tensor).tobytes()[:64]))
    for method, url, headers, body in requests:
        haystack = body + url.encode() + json.dumps(headers).encode()
        for label, needle in needles:
            assert needle not in haystack, f"{method} {url} contains {label}"
        if method == "POST" and url.endswith("/update"):
            payload = wire.decode(body, expected_kind="delta")  # only ever a delta, never weights
            assert payload.kind == "delta"
        elif body:
            parsed = json.loads(body)  # everything else is small JSON of booleans and numbers
            assert set(parsed) <= {"eligibility", "model_version", "results", "registration_key"}, parsed


def test_server_logs_hold_no_typed_text(session: dict[str, Any]) -> None:
    log = session["server_log"]
    for message in TYPED:
        assert message not in log
    assert "aardvark" not in log and "quizzical" not in log


# ---------------------------------------------------------------------- more sessions


def _tiny_server(server_factory, tmp_path: Path, *args: str) -> ServerProcess:
    vocab = vocab_for(TYPED, size=preset("tiny").vocab_size - 4)
    vocab.save(tmp_path / "vocab.json")
    return server_factory("--vocab-file", str(tmp_path / "vocab.json"), "--round-goal", "1", "--min-count", "1", *args)


def test_bundled_initial_model_is_never_used_as_a_round_base(server_factory, tmp_path: Path) -> None:
    """A device that starts offline on its bundled model (same layout, even the same version
    number as the server's model) trains a round on the server's model, not on its own."""
    from device_app.testing import make_bundle

    srv = _tiny_server(server_factory, tmp_path)
    bundle = make_bundle(tmp_path / "bundle", TYPED, seed=123, vocab=vocab_for(TYPED, preset("tiny").vocab_size - 4),
                         model_version=1)
    transport = SwitchableTransport()
    settings = ClientSettings(eligibility=EligibilitySettings(idle_after_s=0.0, use_battery_sensor=False))
    c = DeviceClient(tmp_path / "device", srv.url, settings=settings, transport=transport, initial_bundle=bundle)
    try:
        assert c.models.global_version == 1 and c.server_version() is None
        assert c.suggest("see you to")  # offline-capable from the start
        for m in TYPED:
            c.commit(m)
        outcome = c.participate_once()
        assert outcome.status == "uploaded", outcome
        assert c.server_version() == 1
        config = load_config(c)
        upload = next(b for m, u, _, b in transport.requests if u.endswith("/update"))
        delta = wire.decode(upload, config, expected_kind="delta").tensors
        srv.wait_round(outcome.round_id)
        v1, v2 = server_model(srv, 1, config), server_model(srv, 2, config)
        for a, b, d in zip(v1, v2, delta):
            np.testing.assert_allclose(b, a + d, rtol=1e-5, atol=1e-6)
        initial = load_bundle(bundle).weights
        assert not np.allclose(initial[0], v1[0])  # the bundle really was a different model
    finally:
        c.close()


def test_headless_cli_runs_one_round(server_factory, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    srv = _tiny_server(server_factory, tmp_path)
    typed = tmp_path / "typed.txt"
    typed.write_text("\n".join(TYPED) + "\n")
    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "device_app", "--headless", "--data-dir", str(tmp_path / "device"), "--server", srv.url]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FK_INITIAL_BUNDLE": ""}
    proc = subprocess.run([*base, "--type-file", str(typed), "--once"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert any(item.startswith("uploaded round 1") for item in report["done"]), report["done"]
    assert report["status"]["contributions"] == 1 and report["status"]["messages"] == len(TYPED)
    proc = subprocess.run([*base, "--forget"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "forgot" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_headless_device_stops_on_a_signal_after_its_round_and_keeps_its_data(server_factory, tmp_path: Path,
                                                                            sig: int) -> None:
    """A headless device that keeps participating stops on Ctrl-C / SIGTERM once its round is uploaded,
    exits 128 + the signal without a traceback, and its data dir still works (a later --once run)."""
    import os
    import subprocess
    import sys

    srv = _tiny_server(server_factory, tmp_path)
    typed = tmp_path / "typed.txt"
    typed.write_text("\n".join(TYPED) + "\n")
    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "device_app", "--headless", "--data-dir", str(tmp_path / "device"), "--server", srv.url]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FK_INITIAL_BUNDLE": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*base, "--type-file", str(typed), "--interval", "1"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "uploaded round" in line:
                break
        assert proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, ("".join(lines) + rest)[-3000:]
    assert "Traceback" not in rest, rest[-3000:]
    again = subprocess.run([*base, "--once"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    status = json.loads(again.stdout[again.stdout.index("{"):])["status"]
    assert status["contributions"] >= 1 and status["messages"] == len(TYPED)
