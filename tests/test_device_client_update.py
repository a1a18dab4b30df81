"""The client update without HTTP (device_app/client_update.py), and the upload step it feeds
(device_app/uploads.py) against an in-process mock server."""
from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_app.client_update import ClientOutput, TrainingCancelled, client_hyperparams, local_examples, train_round
from device_app.connection import ServerConnection
from device_app.device_state import DeviceState
from device_app.http_client import Task
from device_app.pending import PendingUploads
from device_app.progress import ProgressReporter
from device_app.secagg import PaillierHook, SecAggError, SecAggHook, SecureAggregation
from device_app.sent_log import SentLog
from device_app.settings import ClientSettings
from device_app.testing import SAMPLE_MESSAGES, make_bundle
from device_app.uploads import ProtectedUpload, UploadContext, WireUpload, flush_pending, upload_for
from models import dp, wire
from models.bundle import Bundle, load_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_bundle(tmp_path_factory.mktemp("bundle") / "initial", SAMPLE_MESSAGES))


def _task(**kw) -> Task:
    fields = dict(type="train", round_id=3, raw={}, base_version=1, epochs=1, batch_size=8, learning_rate=0.5,
                  clip_norm=0.0, noise_stddev=0.0, dp_mode="distributed", upload_url="/v1/rounds/3/update",
                  upload_dtypes=["float32"], deadline=None)
    fields.update(kw)
    return Task(**fields)


def _examples(bundle: Bundle, max_examples: int | None = None, seed: int = 0):
    return local_examples(list(SAMPLE_MESSAGES) * 2, bundle.vocab, bundle.config.seq_len, max_examples,
                          np.random.default_rng(seed))


# ----------------------------------------------------------------------------------- train_round


def test_train_round_returns_a_clipped_delta_with_its_counts(bundle: Bundle) -> None:
    examples = _examples(bundle)
    base = list(bundle.weights)
    out = train_round(_task(clip_norm=0.05), examples, base, bundle.config, rng=np.random.default_rng(0))
    assert isinstance(out, ClientOutput) and out.config == bundle.config
    assert [d.shape for d in out.delta] == [np.shape(w) for w in base]
    assert out.num_examples == len(examples[0]) > 0
    assert out.privacy["clipped"] and out.privacy["norm_before_clip"] > 0.05
    assert dp.l2_norm(out.delta) == pytest.approx(0.05, rel=1e-4)
    assert set(out.metrics) == {"loss_first_epoch", "loss_last_epoch", "train_seconds"}
    assert all(np.isfinite(v) for v in out.metrics.values())
    assert out.metadata() == {"num_examples": out.num_examples, "metrics": out.metrics}
    assert out.training["steps"] == -(-out.num_examples // 8)


def test_train_round_reports_the_adaptive_clip_bit_only_when_asked(bundle: Bundle) -> None:
    """DP-FTRL adaptive clipping: the one bit the server counts is whether the norm before clipping was
    <= the task's estimate; without an estimate nothing extra leaves the device."""
    examples = _examples(bundle)
    base = list(bundle.weights)
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - the same training both times
    low = train_round(_task(clip_norm=0.05, raw={"clip_estimate": 1e-6}), examples, base, bundle.config, rng=rng())
    high = train_round(_task(clip_norm=0.05, raw={"clip_estimate": 1e6}), examples, base, bundle.config, rng=rng())
    assert low.metrics["below_clip_estimate"] == 0.0 and high.metrics["below_clip_estimate"] == 1.0
    assert low.metadata()["metrics"]["below_clip_estimate"] == 0.0  # it travels with the delta
    np.testing.assert_array_equal(low.delta[0], high.delta[0])  # the bit changes nothing else


def test_train_round_is_reproducible_from_the_seed_and_noises_as_told(bundle: Bundle) -> None:
    examples, base = _examples(bundle), list(bundle.weights)
    a = train_round(_task(noise_stddev=0.01), examples, base, bundle.config, rng=np.random.default_rng(5))
    b = train_round(_task(noise_stddev=0.01), examples, base, bundle.config, rng=np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a.delta, b.delta))
    assert a.privacy["noise_stddev"] == 0.01 and a.privacy["norm_sent"] > a.privacy["norm_after_clip"]
    clean = train_round(_task(), examples, base, bundle.config, rng=np.random.default_rng(5))
    assert clean.privacy["norm_sent"] == pytest.approx(clean.privacy["norm_before_clip"])


def test_task_hyperparameters_reach_the_trainer(bundle: Bundle) -> None:
    task = _task(epochs=2, batch_size=4, learning_rate=0.25)
    hp = client_hyperparams(task)
    assert (hp.client_epochs, hp.batch_size, hp.client_lr) == (2, 4, 0.25)
    out = train_round(task, _examples(bundle, 10), list(bundle.weights), bundle.config, rng=np.random.default_rng(0))
    assert out.num_examples == 10 and out.training["epochs"] == 2 and out.training["steps"] == 2 * 3


def test_capped_local_examples_are_a_fresh_uniform_draw_each_round(bundle: Bundle) -> None:
    """As the simulation's round_epochs: a new random subset per round, so rounds together reach all the text."""
    x, y = _examples(bundle)
    pairs = {(a.tobytes(), b.tobytes()) for a, b in zip(x, y)}
    assert len(pairs) > 8
    draws = [_examples(bundle, 5, seed) for seed in range(40)]
    for cx, cy in draws:
        assert len(cx) == len(cy) == 5 and {(a.tobytes(), b.tobytes()) for a, b in zip(cx, cy)} <= pairs
    assert len({cx.tobytes() for cx, _ in draws}) > 30  # a fresh draw, not one fixed subset
    assert {(a.tobytes(), b.tobytes()) for cx, cy in draws for a, b in zip(cx, cy)} == pairs  # nothing left unseen
    fx, _ = _examples(bundle, len(x) + 3)
    assert np.array_equal(fx, x)  # under the cap: every window, in order


def test_train_round_stops_when_asked(bundle: Bundle) -> None:
    with pytest.raises(TrainingCancelled):
        train_round(_task(), _examples(bundle), list(bundle.weights), bundle.config, rng=np.random.default_rng(0),
                    should_stop=lambda: True)


# ----------------------------------------------------------------------------------- uploads


def _output(bundle: Bundle) -> ClientOutput:
    delta = [np.full(np.shape(w), 0.001, np.float32) for w in bundle.weights]
    return ClientOutput(delta=delta, config=bundle.config, num_examples=7, metrics={"loss_last_epoch": 1.0},
                        privacy={"clipped": False, "clip_norm": 1.0}, training={"steps": 1})


def _context(tmp_path: Path, handle) -> UploadContext:
    lock = threading.RLock()
    state = DeviceState(tmp_path / "state.json", "http://localhost", lock)
    state.data.update(device_id="d_1", token="tok")
    link = ServerConnection(ClientSettings(server_url="http://localhost"), state, lock,
                            transport=httpx.MockTransport(handle))
    return UploadContext(link, SentLog(tmp_path / "sent.jsonl", lock), PendingUploads(tmp_path / "pending"), state,
                         ProgressReporter())


def test_upload_for_picks_the_protocol_the_task_asks_for(tmp_path: Path) -> None:
    ctx = _context(tmp_path, lambda r: httpx.Response(404))
    hooks = [SecAggHook(), PaillierHook()]
    assert all(isinstance(h, SecureAggregation) for h in hooks)  # the whole protocol, no optional parts
    assert isinstance(upload_for(_task(), hooks, ctx, "float32"), WireUpload)
    paillier = upload_for(_task(secure_aggregation={"protocol": "paillier", "version": 1}), hooks, ctx, "float32")
    assert isinstance(paillier, ProtectedUpload) and paillier.name == "paillier"
    assert upload_for(_task(secure_aggregation={"protocol": "unknown"}), hooks, ctx, "float32") is None


def test_wire_upload_sends_the_delta_and_waits_in_pending_while_the_server_fails(tmp_path: Path,
                                                                               bundle: Bundle) -> None:
    bodies: list[bytes] = []
    answers = [httpx.Response(503, json={"error": "busy", "detail": ""}),
               httpx.Response(200, json={"status": "accepted"})]

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return answers.pop(0)

    ctx = _context(tmp_path, handle)
    out = _output(bundle)
    first = WireUpload(ctx, "float16").send(_task(upload_dtypes=["float32", "float16"]), out)
    assert first.status == "pending" and ctx.pending.rounds() == [3]
    payload = wire.decode(bodies[0], bundle.config, expected_kind="delta")
    assert payload.metadata == out.metadata() and payload.model_version == 1
    assert np.allclose(payload.tensors[0], 0.001, atol=1e-6)  # float16 on the wire, as preferred
    flush_pending(ctx)
    assert bodies[1] == bodies[0] and ctx.pending.rounds() == []
    assert [e["status"] for e in ctx.sent_log.entries()] == ["rejected", "accepted"]
    assert ctx.state.data["contributions"] == 1 and ctx.state.data["last_round"]["round_id"] == 3


class _RecordingHook:
    """A complete SecureAggregation stand-in that records the calls and can refuse at begin."""

    name = "recording"

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[str] = []
        self.should_stop = None

    def supports(self, params: dict) -> bool:
        return params.get("protocol") == "recording"

    def begin(self, api, task) -> None:
        self.calls.append("begin")
        if self.refuse:
            raise SecAggError("bad_keys", "refused")

    def submit(self, api, task, tensors, metadata) -> dict:
        self.calls.append("submit")
        return {"bytes": 123, "payload_sha256": "ab", "timings": {}}

    def abort(self, api, task) -> None:
        self.calls.append("abort")


def test_protected_upload_runs_the_hook_and_logs_each_outcome(tmp_path: Path, bundle: Bundle) -> None:
    ctx = _context(tmp_path, lambda r: httpx.Response(404))
    task = _task(secure_aggregation={"protocol": "recording"})
    hook = _RecordingHook()
    assert isinstance(hook, SecureAggregation)
    upload = upload_for(task, [hook], ctx, "float32")
    assert upload is not None and upload.begin(task) is None
    done = upload.send(task, _output(bundle))
    assert done.status == "uploaded" and hook.calls == ["begin", "submit"]
    assert ctx.sent_log.entries()[-1]["secure_aggregation"] == "recording"
    assert ctx.state.data["last_round"]["secure_aggregation"] == "recording"

    refusing = _RecordingHook(refuse=True)
    refused = ProtectedUpload(ctx, refusing).begin(task)
    assert refused is not None and refused.status == "secagg_failed"
    assert ctx.sent_log.entries()[-1] == {**ctx.sent_log.entries()[-1], "type": "secagg", "status": "failed",
                                          "error": "bad_keys"}
