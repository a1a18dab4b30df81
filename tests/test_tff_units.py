"""tff_sim pieces that need no TFF round: config, sampling, batches, checkpoints, reports, push."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from models.config import preset
from models.vocab import Vocabulary
from tff_sim import checkpoint, report, sampling
from tff_sim.client_data import ClientExamples, client_batches, client_dataset, round_epochs
from tff_sim.config import SimConfig, parse_args


# --------------------------------------------------------------------------- config


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "tiny", "rounds": 7, "client-lr": 0.1}))
    cfg = parse_args(["--config", str(path), "--rounds", "3"])
    assert (cfg.preset, cfg.rounds, cfg.client_lr) == ("tiny", 3, 0.1)
    assert cfg.clients_per_round == SimConfig().clients_per_round


def test_toml_config_and_bool_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[tff_sim]\npreset = "gboard"\ndp = true\ntarget_epsilon = 8.0\naccountants = ["rdp"]\n')
    cfg = parse_args(["--config", str(path), "--no-tensorboard", "--server-optimizer", "adam"])
    assert cfg.preset == "gboard" and cfg.dp and cfg.target_epsilon == 8.0 and cfg.accountants == ("rdp",)
    assert not cfg.tensorboard and cfg.server_optimizer == "adam"
    assert cfg.sampling_mode == "poisson"


@pytest.mark.parametrize("argv", [
    ["--rounds", "0"],
    ["--noise-multiplier", "1.0"],  # needs --dp
    ["--dp", "--noise-multiplier", "1", "--target-epsilon", "3"],
    ["--push", "http://127.0.0.1:1"],  # needs a token
    ["--config", "/nonexistent.json"],
])
def test_bad_settings_are_refused(argv, monkeypatch):
    monkeypatch.delenv("FK_ADMIN_TOKEN", raising=False)
    with pytest.raises((ValueError, SystemExit, FileNotFoundError)):
        parse_args(argv)


def test_config_hash_ignores_output_and_rounds_but_not_training_settings():
    base = SimConfig(preset="tiny")
    assert base.config_hash() == base.replace(output="/x", rounds=99, push_path="/p").config_hash()
    assert base.config_hash() != base.replace(client_lr=0.1).config_hash()
    # the optimizer hyperparameters added with models/fedavg.py keep old runs' hashes at their defaults
    assert base.config_hash() != base.replace(beta2=0.999).config_hash()
    assert "beta2" not in base.identity() and "beta2" in base.replace(beta2=0.999).identity()
    assert base.fedavg.server_optimizer == "nesterov" and (base.fedavg.beta2, base.fedavg.eps) == (0.99, 1e-3)
    assert parse_args(["--server-optimizer", "adagrad", "--eps", "0.01"]).fedavg.eps == 0.01
    with pytest.raises(ValueError):
        SimConfig(server_optimizer="adam", beta1=1.0)
    calibrated = SimConfig(dp=True, target_epsilon=5.0)
    assert calibrated.config_hash() != calibrated.replace(rounds=99).config_hash()  # the noise depends on rounds


# --------------------------------------------------------------------------- sampling and batches


def test_sampling_depends_only_on_seed_and_round():
    ids = [f"c{i}" for i in range(50)]
    a = sampling.sample_clients(ids, 3, 7, 10, "uniform")
    assert a == sampling.sample_clients(ids, 3, 7, 10, "uniform")
    assert len(a) == len(set(a)) == 10
    assert a != sampling.sample_clients(ids, 4, 7, 10, "uniform")
    assert a != sampling.sample_clients(ids, 3, 8, 10, "uniform")
    sizes = [len(sampling.sample_clients(ids, r, 0, 10, "poisson")) for r in range(1, 400)]
    assert abs(np.mean(sizes) - 10) < 1.0 and len(set(sizes)) > 3  # q = 10/50, variable cohorts


def test_uniform_sampling_is_uniform():
    ids = [f"c{i}" for i in range(20)]
    counts = np.zeros(20)
    for r in range(1, 2001):
        for cid in sampling.sample_clients(ids, r, 1, 5, "uniform"):
            counts[int(cid[1:])] += 1
    expected = 2000 * 5 / 20
    assert np.all(np.abs(counts - expected) < 0.15 * expected)


def _client(n=37, seq_len=5):
    x = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return ClientExamples("c", 3, x, x + 1)


def test_round_examples_cap_order_and_epochs():
    c = _client()
    (x1, y1), (x2, _) = round_epochs(c, 1, 0, 2, 20)
    assert len(x1) == len(x2) == 20 and np.array_equal(y1, x1 + 1)
    assert sorted(map(tuple, x1)) == sorted(map(tuple, x2))  # epoch 2 revisits the same subset
    assert not np.array_equal(x1, x2)  # in another order
    assert not np.array_equal(x1, round_epochs(c, 2, 0, 1, 20)[0][0])  # another round, another subset


def test_tf_dataset_holds_exactly_the_plain_batches():
    c = _client()
    batches = client_batches(c, 5, 1, 2, 8, 30)  # 30 per epoch: 8, 8, 8, 6 twice
    assert [len(b[0]) for b in batches] == [8, 8, 8, 6, 8, 8, 8, 6]
    got = [(x.numpy(), y.numpy()) for x, y in client_dataset(c, 5, 1, 2, 8, 30)]
    assert len(got) == len(batches)
    for (gx, gy), (bx, by) in zip(got, batches):
        assert np.array_equal(gx, bx) and np.array_equal(gy, by)


# --------------------------------------------------------------------------- checkpoints and reports


def test_checkpoint_roundtrip_keeps_types_and_values(tmp_path):
    state = {"w": [np.ones((2, 3), np.float32), np.arange(4, dtype=np.int64)], "lr": np.float32(0.5),
             "flag": np.bool_(True), "name": b"GaussianDpEvent", "count": 3}
    header = {"round": 4, "history": [{"round": 1, "train_loss": 2.5}]}
    checkpoint.save(tmp_path, state, header)
    template = {"w": [np.zeros((2, 3), np.float32), np.zeros(4, np.int64)], "lr": np.float32(0), "flag": np.bool_(False),
                "name": b"", "count": 0}
    restored, got = checkpoint.load(tmp_path, template)
    assert got["round"] == 4 and got["history"] == header["history"]
    assert np.array_equal(restored["w"][0], state["w"][0]) and restored["w"][1].dtype == np.int64
    assert restored["lr"] == np.float32(0.5) and isinstance(restored["lr"], np.float32)
    assert restored["name"] == b"GaussianDpEvent" and restored["count"] == 3 and bool(restored["flag"])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path, {"w": [np.zeros((2, 3), np.float32)]})


def test_reports_from_a_history(tmp_path):
    history = [
        {"round": 0, "eval_top1_recall": 0.01, "eval_top3_recall": 0.02, "eval_loss": 6.0, "eval_tokens": 10},
        {"round": 1, "clients": 3, "examples": 40, "train_loss": 5.0, "round_seconds": 0.5, "epsilon_rdp": 1.0,
         "epsilon_pld": 0.8},
        {"round": 2, "clients": 3, "examples": 25, "train_loss": 4.0, "round_seconds": 0.5, "epsilon_rdp": 1.5,
         "epsilon_pld": 1.1,
         "eval_top1_recall": 0.1, "eval_top3_recall": 0.2, "eval_loss": 4.5, "eval_tokens": 10},
    ]
    report.write_metrics(tmp_path, history)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("round,clients") and len(lines) == 4
    assert json.loads((tmp_path / "metrics.json").read_text())[2]["epsilon_pld"] == 1.1
    baselines = [{"model": "ngram", "split": "heldout", "top1_recall": 0.15, "top3_recall": 0.25}]
    plots = report.plot_all(tmp_path, history, baselines)
    assert {p.name for p in plots} == {"recall.png", "recall_vs_examples.png", "loss.png", "epsilon.png"}
    assert report.cumulative_examples(history) == {0: 0, 1: 40, 2: 65}
    assert all(p.stat().st_size > 1000 for p in plots)
    summary = {"config": SimConfig(preset="tiny", dp=True).public_dict(), "rounds_done": 2, "output": str(tmp_path),
               "data": {"train_clients": 5, "heldout_clients": 2, "vocab_size": 504}, "wall_seconds": 3.0,
               "final": {"test": {"top1_recall": 0.1, "top3_recall": 0.2, "perplexity": 50.0, "tokens": 9}},
               "privacy": {"noise_multiplier": 1.0, "sampling_prob": 0.5, "delta": 1e-3, "calibrated_for": None,
                           "final_epsilon": {"rdp": 1.5, "pld": math.inf}}}
    text = report.write_report(tmp_path, summary, history, baselines, plots).read_text()
    assert "| federated (this run) | test | 10.00 | 20.00" in text and "ngram (baseline)" in text
    assert "RDP 1.500" in text and "PLD inf" in text and "![recall](recall.png)" in text
    assert "| 2 | 65 | 10.00 | 20.00 |" in text  # the learning curve: round, client examples so far, recall


def test_load_baselines_accepts_a_list_or_rows(tmp_path):
    rows = [{"model": "ngram", "split": "test", "top1_recall": 0.1, "top3_recall": 0.2, "perplexity": 90, "tokens": 5}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows}))
    assert report.load_baselines(tmp_path / "a.json") == rows == report.load_baselines(tmp_path / "b.json")
    assert report.load_baselines(tmp_path / "missing.json") == []


# --------------------------------------------------------------------------- push


def _server(config, vocab, initialized=True, seen=None):
    seen = seen if seen is not None else []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer secret":
            return httpx.Response(401, json={"error": "unauthorized", "detail": "bad token"})
        if request.url.path == "/v1/model/info":
            if not initialized:
                return httpx.Response(409, json={"error": "not_initialized", "detail": "no model"})
            return httpx.Response(200, json={"config_hash": config.config_hash(), "vocab_hash": vocab.content_hash(),
                                             "config": config.to_dict()})
        if request.url.path == "/v1/admin/init":
            return httpx.Response(201, json={"version": 1})
        if request.url.path == "/v1/admin/models":
            from models import wire

            payload = wire.decode(request.content, config, expected_kind="weights")
            return httpx.Response(200, json={"version": 2, "state": "candidate", "model_version": payload.model_version})
        return httpx.Response(404, json={"error": "not_found"})

    return httpx.MockTransport(handler), seen


def test_push_sends_wire_weights_as_candidate():
    from tff_sim.push import PushError, push_model

    config = preset("tiny")
    vocab = Vocabulary([f"w{i}" for i in range(config.vocab_size - 4)])
    weights = [np.full(shape, 0.5, np.float32) for _, shape in config.weight_specs()]
    transport, seen = _server(config, vocab)
    with httpx.Client(transport=transport, base_url="http://server") as client:
        result = push_model("http://server", "secret", config, vocab, weights, model_version=7, note="n", client=client)
    assert (result.version, result.state, result.initialized_server) == (2, "candidate", False)
    assert seen[-1].url.params["promote"] == "false" and seen[-1].headers["content-type"] == "application/octet-stream"
    assert result.response["model_version"] == 7

    other = Vocabulary([f"x{i}" for i in range(config.vocab_size - 4)])
    transport, _ = _server(config, other)
    with httpx.Client(transport=transport, base_url="http://server") as client, pytest.raises(PushError) as err:
        push_model("http://server", "secret", config, vocab, weights, client=client)
    assert err.value.reason == "vocab_mismatch"

    transport, seen = _server(config, vocab, initialized=False)
    with httpx.Client(transport=transport, base_url="http://server") as client:
        result = push_model("http://server", "secret", config, vocab, weights, client=client)
    assert result.initialized_server and [r.url.path for r in seen][-2:] == ["/v1/admin/init", "/v1/admin/models"]

    transport, _ = _server(config, vocab)
    with httpx.Client(transport=transport, base_url="http://server") as client, pytest.raises(PushError) as err:
        push_model("http://server", "wrong", config, vocab, weights, client=client)
    assert err.value.reason == "unauthorized"


def test_push_to_the_real_server_app(tmp_path):
    """Against server/app.py in-process: an empty server is initialised, the model staged as candidate."""
    pytest.importorskip("fastapi")
    app_module = pytest.importorskip("server.app")
    from fastapi.testclient import TestClient

    from server.config import ServerConfig
    from tff_sim.push import push_model

    config = preset("tiny")
    vocab = Vocabulary([f"w{i}" for i in range(config.vocab_size - 4)])
    weights = [np.full(shape, 0.01, np.float32) for _, shape in config.weight_specs()]
    app = app_module.create_app(ServerConfig(data_dir=str(tmp_path / "server"), admin_token="secret"))
    with TestClient(app) as client:
        first = push_model("http://testserver", "secret", config, vocab, weights, model_version=3, client=client,
                           metadata={"source": "tff_sim"})
        second = push_model("http://testserver", "secret", config, vocab, weights, model_version=4, client=client)
        versions = client.get("/v1/admin/versions", headers={"Authorization": "Bearer secret"}).json()
    assert first.initialized_server and first.state == "candidate"
    assert not second.initialized_server and versions["candidate_version"] == second.version
