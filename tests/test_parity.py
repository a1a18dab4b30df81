"""Parity: the TFF simulation and the real system (server + headless devices) train the same model.

The same clients (chitchat users), the same text, the same initial weights and hyperparameters,
no DP: once through `tff_sim.runner.run` (TFF weighted FedAvg, client SGD, TFF's server optimizer)
and once through a real `python -m server` subprocess with one `device_app.client.DeviceClient`
per user (check-in, model download, local SGD in `device_app.local_training`, delta, float32 wire
upload; the server's example-weighted streaming mean and its server optimizer, server/optimizers.py
over models/fedavg.py). Both sides get their server optimizer from one models.fedavg.FedAvgHyperparams:
the test runs sgd (lr 1, plain FedAvg), momentum (heavy ball 0.9) and adam (FedAdam, lr 0.01). Every round
all clients take part on both sides (TFF: clients_per_round = population with uniform sampling;
server: round goal = min_count = number of devices, over-admission 1.0).

What has to line up, and how it does:
- Data: each device trains on what its store offers (the oldest 80% of the typed messages; the
  most recent 20% are held back); the TFF client is built from exactly those messages, through the
  same tokenizer and `models.examples` windows.
- Batch order: the two sides shuffle differently (device: `np.random.default_rng(seed).permutation`,
  tff_sim: `sampling.example_order(n, seed, round, client, epoch)`), and neither has an option to
  switch shuffling off. With one batch per epoch (batch size >= every client's example count,
  max_examples_per_client too), the order only permutes the rows of that batch: the mean loss and
  its gradient are the same sums in another order, so multiple epochs stay comparable.
- Weighting: TFF weights a client by the examples it processed (epochs x n), the server by the
  upload's num_examples (n): the same normalized weights.

Why it is not bit-identical, and the bound:
- The device's training step computes logits only at real (non-pad) positions (boolean_mask, then
  one matmul against the tied embedding); TFF runs the Keras model on every position and masks the
  loss. Same math, other float32 reduction orders (rows permuted, other matmul shapes).
- The server averages in float64 in arrival order (threads: not deterministic) and casts once;
  TFF averages in float32 in client order.
- The server steps its optimizer in float64 (state kept in float64), TFF in float32. Adam divides by
  sqrt(p) + eps, which scales a rounding difference in the mean delta by at most ~lr / (4 eps) = 2.5
  (lr 0.01, eps 1e-3), where |g| is near eps; elsewhere its step barely depends on g's size.
Each of these is a float32 rounding difference (relative 2^-24 ~ 6e-8 per operation); through
E local steps and R rounds they compound. Measured (artifacts/bench/parity*.json): tiny, 4 clients,
3 rounds x 2 epochs: max |diff| 6.0e-8, ||diff|| / ||w_tff - w0|| 1.7e-7; small (440k parameters),
8 clients, 5 rounds: 1.2e-7 and 2.7e-7, i.e. one or two float32 ulps of the weights. The test
bounds max |w_tff - w_server| <= 1e-6 and ||w_tff - w_server|| <= 1e-5 * ||w_tff - w0|| (a margin
of ~10-40x over what was measured), while one local epoch fewer moves the result by ~50% of the
update (`control_*` in the figures): the check can tell a real difference from rounding.

    .venv/bin/python tests/test_parity.py                      # the figures (tiny preset) as JSON
    .venv/bin/python tests/test_parity.py --preset small --rounds 3 --out artifacts/bench/parity.json
    .venv/bin/python tests/test_parity.py --server-optimizer adam --server-lr 0.01
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_ABS_BOUND = 1e-6
REL_L2_BOUND = 1e-5
# server optimizer -> its server learning rate in the test (Adam's step is ~lr per coordinate)
SERVER_OPTIMIZERS = {"sgd": 1.0, "momentum": 1.0, "adam": 0.01}


def server_flags(hp) -> list[str]:
    """The server optimizer of `hp` (models.fedavg.FedAvgHyperparams) as `python -m server` flags."""
    return ["--server-optimizer", hp.server_optimizer, "--server-lr", repr(hp.server_lr),
            "--server-momentum", repr(hp.server_momentum), "--beta1", repr(hp.beta1), "--beta2", repr(hp.beta2),
            "--eps", repr(hp.eps)]


def pick_clients(ds, n_clients: int, seed: int, min_messages: int = 8, max_messages: int = 30) -> list[str]:
    from models.data.types import seeded_order

    out = []
    for cid in seeded_order(ds.train_ids, seed, "parity"):
        c = ds.clients[cid]
        if min_messages <= len(c.train) <= max_messages:
            out.append(cid)
        if len(out) == n_clients:
            break
    return sorted(out)


def run_parity(tmp: Path, *, preset_name: str = "tiny", n_clients: int = 4, rounds: int = 3, epochs: int = 2,
               lr: float = 0.5, batch_size: int = 256, seed: int = 0, server_optimizer: str = "sgd",
               server_lr: float = 1.0) -> dict[str, Any]:
    from device_app.client import ClientSettings, DeviceClient
    from device_app.eligibility import Eligibility
    from device_app.local_training import examples_for
    from models import wire
    from models.bundle import save_bundle
    from models.config import preset
    from models.data import load_dataset
    from models.data.types import ClientData, FederatedDataset
    from models.fedavg import FedAvgHyperparams
    from models.tokenizer import tokenize_sentences
    from models.vocab import Vocabulary
    from tests.server_fixtures import ServerProcess
    from tff_sim import client_data, process, runner
    from tff_sim.config import SimConfig

    t0 = time.monotonic()
    hp = FedAvgHyperparams(client_lr=lr, client_epochs=epochs, batch_size=batch_size,
                           server_optimizer=server_optimizer, server_lr=server_lr)
    ds = load_dataset("chitchat", seed=0)
    ids = pick_clients(ds, n_clients, seed)
    assert len(ids) == n_clients, "not enough small chitchat clients"
    vocab = Vocabulary.build((t for text in ds.all_train_sentences() for t in tokenize_sentences(text)),
                             size=preset(preset_name).vocab_size - 4)
    config = preset(preset_name, vocab_size=len(vocab))
    w0 = process.initial_weights(config, seed)  # what tff_sim.runner starts from, too
    bundle = save_bundle(tmp / "init_bundle", config, vocab, w0, 0, {"source": "test_parity"})

    # ---------------------------------------------------------------- the real system
    srv = ServerProcess(tmp / "server", [
        "--init-bundle", str(bundle), "--round-goal", str(n_clients), "--min-count", str(n_clients),
        "--over-admit", "1.0", "--deadline-s", "3600", "--epochs", str(epochs), "--batch-size", str(batch_size),
        "--learning-rate", str(lr), "--dp-mode", "none", "--clip-norm", "0", "--aggregator", "mean",
        *server_flags(hp), "--upload-dtypes", "float32", "--retry-min-s", "1",
        "--max-examples-per-update", "100000"], tmp / "server.log").start()
    eligible = Eligibility(charging=True, unmetered=True, idle=True)
    devices: dict[str, DeviceClient] = {}
    training: dict[str, list[str]] = {}
    try:
        for k, cid in enumerate(ids):
            settings = ClientSettings(server_url=srv.url, auto_personalize=False)
            dev = DeviceClient(tmp / f"device-{k}", settings=settings, initial_bundle=False, seed=seed + k,
                               persist_models=False)
            for msg in ds.clients[cid].train:
                dev.commit(msg, typed_now=False)
            training[cid] = dev.store.training_messages()
            n = len(examples_for(training[cid], vocab, config.seq_len)[0])
            assert 0 < n <= batch_size, f"client {cid}: {n} examples, not one batch of {batch_size}"
            devices[cid] = dev
        with srv.admin() as admin:
            version = admin.get("/v1/admin/status").json()["global_version"]
            for r in range(rounds):
                for cid in ids:
                    out = devices[cid].participate_once(eligibility=eligible)
                    assert out.status == "uploaded", f"round {r + 1}, {cid}: {out}"
                deadline = time.monotonic() + 60
                while admin.get("/v1/admin/status").json()["global_version"] != version + 1:
                    assert time.monotonic() < deadline, "the round did not aggregate"
                    time.sleep(0.05)
                version += 1
            blob = admin.get("/v1/models/current").content
        server_w = [np.array(t, np.float64) for t in wire.decode(blob, config, expected_kind="weights").tensors]
        examples = {cid: len(examples_for(training[cid], vocab, config.seq_len)[0]) for cid in ids}
    finally:
        for dev in devices.values():
            dev.close()
        srv.stop()
    t_server = time.monotonic() - t0

    # ---------------------------------------------------------------- the simulation
    t1 = time.monotonic()
    fds = FederatedDataset("parity", {cid: ClientData(cid, train=training[cid], test=[]) for cid in ids},
                           train_ids=sorted(ids), heldout_ids=[], seed=0)
    data = client_data.prepare(fds, preset_name=preset_name, vocab=vocab, eval_clients=0,
                               final_eval_max_sentences=None)
    assert data.train_ids == sorted(ids) and all(len(data.train[c]) == examples[c] for c in ids)

    def sim(r: int, e: int, out: str) -> list[np.ndarray]:
        cfg = SimConfig(dataset="parity", preset=preset_name, rounds=r, clients_per_round=n_clients,
                        client_epochs=e, batch_size=batch_size, max_examples_per_client=batch_size, client_lr=lr,
                        server_optimizer=hp.server_optimizer, server_lr=hp.server_lr,
                        server_momentum=hp.server_momentum, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                        sampling="uniform", seed=seed, dp=False,
                        eval_every=0, output=str(tmp / out), checkpoint_every=0, fresh=True, tensorboard=False,
                        plots=False, progress=False, baselines=None)
        return [np.array(w, np.float64) for w in runner.run(cfg, data=data).weights]

    tff_w = sim(rounds, epochs, "tff")
    t_tff = time.monotonic() - t1
    control_w = sim(rounds, epochs - 1, "tff-control") if epochs > 1 else sim(rounds - 1, epochs, "tff-control")

    def flat(ws: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([w.reshape(-1) for w in ws])

    a, b, c, init = flat(tff_w), flat(server_w), flat(control_w), flat([np.asarray(w, np.float64) for w in w0])
    moved = float(np.linalg.norm(a - init))
    return {
        "preset": preset_name, "parameters": int(a.size), "clients": ids, "examples": examples, "rounds": rounds,
        "epochs": epochs, "client_lr": lr, "batch_size": batch_size, "server_optimizer": server_optimizer,
        "server_lr": server_lr,
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "rel_l2_diff_vs_update": float(np.linalg.norm(a - b)) / moved if moved else math.inf,
        "rel_l2_diff_vs_weights": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "update_norm": moved,
        "per_tensor_max_abs": [float(np.max(np.abs(x - y))) for x, y in zip(tff_w, server_w)],
        "control": "one local epoch fewer" if epochs > 1 else "one round fewer",
        "control_max_abs_diff": float(np.max(np.abs(a - c))),
        "control_rel_l2_vs_update": float(np.linalg.norm(a - c)) / moved if moved else math.inf,
        "seconds_server_side": round(t_server, 1), "seconds_tff": round(t_tff, 1),
        "bounds": {"max_abs": MAX_ABS_BOUND, "rel_l2_vs_update": REL_L2_BOUND},
    }


@pytest.mark.slow
@pytest.mark.parametrize("server_optimizer", sorted(SERVER_OPTIMIZERS))
def test_tff_simulation_and_real_server_agree(tmp_path, server_optimizer):
    fig = run_parity(tmp_path, preset_name="tiny", n_clients=4, rounds=3, epochs=2,
                     server_optimizer=server_optimizer, server_lr=SERVER_OPTIMIZERS[server_optimizer])
    print(json.dumps(fig, indent=2))
    assert fig["update_norm"] > 0.1, "training did not move the model: the comparison would say nothing"
    # the check can tell a real difference apart: one local epoch fewer is far outside the bounds
    assert fig["control_rel_l2_vs_update"] > 100 * REL_L2_BOUND
    assert fig["max_abs_diff"] <= MAX_ABS_BOUND, fig
    assert fig["rel_l2_diff_vs_update"] <= REL_L2_BOUND, fig


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description="TFF vs real-system parity figures")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--server-optimizer", default="sgd", help="sgd, momentum, nesterov, adam, yogi, adagrad")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fk-parity-") as tmp:
        fig = run_parity(Path(tmp), preset_name=args.preset, n_clients=args.clients, rounds=args.rounds,
                         epochs=args.epochs, lr=args.lr, server_optimizer=args.server_optimizer,
                         server_lr=args.server_lr)
    text = json.dumps(fig, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    from tff_sim.reaper import reap_worker_binaries

    reap_worker_binaries()
    return 0 if fig["max_abs_diff"] <= MAX_ABS_BOUND and fig["rel_l2_diff_vs_update"] <= REL_L2_BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
