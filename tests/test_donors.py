"""Donors and the federated population (models/data/donors.py, docs/donors.md): the split, and each consumer's option."""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

import numpy as np
import pytest

from models.data import load_dataset, select_population
from models.data.donors import (build_vocab, default_vocab_source, donor_split_report, ids_hash, vocab_texts)
from models.data.split import build_federated, choose_heldout
from models.data.types import DEFAULT_DONOR_FRACTION, ClientData, FederatedDataset, choose_donors
from models.tokenizer import tokenize
from models.vocab import Vocabulary


def _word(i: int) -> str:
    """The word only client i writes: "zz" + its two digits as letters (c07 -> "zzah")."""
    return "zz" + "".join(chr(ord("a") + int(d)) for d in f"{i:02d}")


def _items(i: int) -> list[str]:
    """Client i's messages: shared words plus one word only this client writes."""
    return [f"hello there {_word(i)} number {j}." for j in range(8)]


@pytest.fixture
def toy() -> FederatedDataset:
    """60 clients, 10% held out (6), so 54 training clients: 5 donors (round(0.1 * 54)), 49 federated."""
    return build_federated("toy", {f"c{i:02d}": _items(i) for i in range(60)}, heldout_fraction=0.1, seed=7)


def _client_words(ds: FederatedDataset, ids) -> set[str]:
    return {_word(int(cid.strip("cu.tx"))) for cid in ids}


# --- the split ------------------------------------------------------------------------------------------


def test_split_partitions_the_training_clients_and_leaves_heldout_alone(toy):
    donors, federated = toy.donor_ids, toy.federated_ids
    assert toy.donor_fraction == DEFAULT_DONOR_FRACTION == 0.1
    assert len(toy.train_ids) == 54 and len(donors) == 5 and len(federated) == 49
    assert donors == sorted(donors) and federated == sorted(federated)
    assert not set(donors) & set(federated)
    assert sorted(donors + federated) == toy.train_ids
    assert not set(donors) & set(toy.heldout_ids) and not set(federated) & set(toy.heldout_ids)
    # the held-out split is the one it always was
    assert toy.heldout_ids == choose_heldout(sorted(toy.clients), 0.1, 7)


def test_split_is_seeded_order_independent_and_stable(toy):
    ids = toy.train_ids
    assert choose_donors(list(reversed(ids)), 0.1, 7) == toy.donor_ids
    assert choose_donors(ids, 0.1, 8) != toy.donor_ids
    again = build_federated("toy", {f"c{i:02d}": _items(i) for i in reversed(range(60))}, heldout_fraction=0.1, seed=7)
    assert again.donor_ids == toy.donor_ids
    # donors are not the held-out ranking's next users: another salt
    assert choose_donors(ids, 0.1, 7) != choose_heldout(ids, 5 / 54, 7)
    # a subset keeps each client's status (not re-drawn among the subset)
    sub = toy.subset(n_clients=30, n_heldout=3)
    assert set(sub.donor_ids) == set(toy.donor_ids) & set(sub.train_ids)
    assert set(sub.federated_ids) == set(toy.federated_ids) & set(sub.train_ids)
    with pytest.raises(ValueError):
        FederatedDataset("x", toy.clients, train_ids=toy.train_ids, heldout_ids=toy.heldout_ids,
                         donor_ids=toy.heldout_ids[:1])


def test_donor_fraction_is_a_parameter():
    items = {f"c{i:02d}": _items(i) for i in range(60)}
    quarter = build_federated("toy", items, heldout_fraction=0.1, seed=7, donor_fraction=0.25)
    assert len(quarter.donor_ids) == 14 and quarter.donor_fraction == 0.25  # round(0.25 * 54)
    none = build_federated("toy", items, heldout_fraction=0.1, seed=7, donor_fraction=0.0)
    assert none.donor_ids == [] and none.federated_ids == none.train_ids


def test_report_records_fraction_seed_counts_and_id_hashes(toy):
    rep = donor_split_report(toy)
    assert rep["donor_fraction"] == 0.1 and rep["seed"] == 7 and rep["salt"] == "donors"
    assert (rep["train_clients"], rep["donors"], rep["federated"], rep["heldout"]) == (54, 5, 49, 6)
    assert rep["donor_ids_sha256"] == ids_hash(toy.donor_ids) and len(rep["donor_ids_sha256"]) == 16
    assert rep["donor_train_items"] == sum(len(toy[c].train) for c in toy.donor_ids)


def test_chitchat_split_is_pinned():
    """The real split, the same in every process: 89 donors among 886 training clients."""
    rep = donor_split_report(load_dataset("chitchat", seed=0))
    assert (rep["train_clients"], rep["donors"], rep["federated"], rep["heldout"]) == (886, 89, 797, 98)
    assert rep["donor_ids_sha256"] == "b0cd690370978748"


def test_select_population(toy):
    assert select_population(toy, "all") is toy  # the default: exactly today's dataset
    for population, ids in (("donors", toy.donor_ids), ("federated", toy.federated_ids)):
        sub = select_population(toy, population)
        assert sub.train_ids == ids and sub.heldout_ids == toy.heldout_ids
        assert sub.info["population"] == population and sub.info["donor_split"] == donor_split_report(toy)
    with pytest.raises(ValueError):
        select_population(toy, "everyone")
    lonely = build_federated("one", {"a": _items(0), "b": _items(1)}, heldout_fraction=0.0)
    assert lonely.donor_ids == []  # round(0.1 * 2) = 0
    with pytest.raises(ValueError, match="empty"):
        select_population(lonely, "donors")


# --- vocabularies ---------------------------------------------------------------------------------------


def test_vocab_sources_read_the_right_users(toy):
    assert default_vocab_source("all") == "all"
    assert default_vocab_source("donors") == default_vocab_source("federated") == "donors"
    donors_vocab = build_vocab(toy, "donors", 1000)
    all_vocab = build_vocab(toy, "all", 1000)
    words = set(donors_vocab.words)
    assert _client_words(toy, toy.donor_ids) <= words and not _client_words(toy, toy.federated_ids) & words
    assert _client_words(toy, toy.train_ids) <= set(all_vocab.words)
    assert not _client_words(toy, toy.heldout_ids) & set(all_vocab.words)
    assert len(vocab_texts(toy, "donors")) == sum(len(toy[c].train) for c in toy.donor_ids)


def test_wordfreq_vocabulary_builds_offline_with_the_requested_size(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for size in (100, 5000):
        vocab = Vocabulary.from_wordfreq(size)
        assert len(vocab) == size + 4 and len(vocab.words) == size
        assert all(tokenize(w) == [w] for w in vocab.words)  # already in the tokenizer's normal form
    assert {"the", "you", "don't", ".", "?", ","} <= set(vocab.words)
    assert "00" not in vocab and "`" not in vocab
    assert Vocabulary.from_wordfreq(5000) == vocab  # deterministic
    assert len(build_vocab(None, "wordfreq", 300).words) == 300
    no_marks = Vocabulary.from_wordfreq(300, punctuation=False)
    assert len(no_marks.words) == 300 and "." not in no_marks


# --- consumers ------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 60) -> Path:
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(n):
        (root / f"u{i:02d}.txt").write_text(" ".join(_items(i)) + "\n", encoding="utf-8")
    return root


def test_baselines_population_donors_trains_on_donors_only(tmp_path):
    from models.baselines import run_baselines
    from models.data import load_text_folder

    folder = _folder(tmp_path)
    ds = load_text_folder(folder)  # as models.baselines loads it: one client per file, none held out
    donors = ds.donor_ids
    res = run_baselines(dataset=str(folder), out=tmp_path / "b", preset_name="tiny", vocab_size=200, order=3,
                        epochs=1, patience=0, max_eval_sentences=50, tensorboard=False, verbose=False,
                        population="donors")
    d = res["data"]
    assert d["train_clients"] == len(donors) == 6 and d["heldout_clients"] == len(ds.heldout_ids)
    assert d["train_sentences"] == sum(len(ds[c].train) for c in donors)
    assert d["population"] == "donors" and d["donor_split"] == donor_split_report(ds)
    assert res["config"]["population"] == "donors" and res["config"]["vocab_source"] == "donors"
    vocab = Vocabulary.load(tmp_path / "b" / "vocab.json")
    assert vocab == build_vocab(ds, "donors", 200)
    assert "population: donors" in (tmp_path / "b" / "report.md").read_text()
    # "test" is the trained users' (the donors') latest text
    assert d["eval_sentences_available"]["test"] == sum(len(ds[c].test) for c in donors)


def test_tff_sim_population_vocab_source_and_init_bundle(tmp_path):
    from models.bundle import save_bundle
    from models.config import preset
    from models.keras_model import build_model, get_weights
    from tff_sim import client_data
    from tff_sim.config import SimConfig, parse_args

    ds = build_federated("toy", {f"c{i:02d}": _items(i) for i in range(60)}, heldout_fraction=0.1, seed=0)
    today = client_data.prepare(ds, preset_name="tiny", vocab_size=304)
    assert today.train_ids == ds.train_ids and today.vocab == client_data.build_vocab(ds, 300)
    assert today.population_name == "all" and today.vocab_source == "all" and today.initial_weights is None

    fed = client_data.prepare(ds, preset_name="tiny", vocab_size=304, population="federated")
    assert fed.train_ids == ds.federated_ids and sorted(fed.eval_clients) == sorted(today.eval_clients)
    assert fed.population == len(ds.federated_ids) and fed.population_name == "federated"
    assert fed.vocab_source == "donors" and fed.vocab == build_vocab(ds, "donors", 300)
    assert fed.heldout_sentences == today.heldout_sentences  # held-out evaluation unchanged
    assert fed.summary()["donor_split"]["donor_ids_sha256"] == ids_hash(ds.donor_ids)
    donors = client_data.prepare(ds, preset_name="tiny", vocab_size=304, population="donors", vocab_source="wordfreq")
    assert donors.train_ids == ds.donor_ids and donors.vocab == Vocabulary.from_wordfreq(300)

    vocab = build_vocab(ds, "donors", 300)
    config = preset("tiny", vocab_size=len(vocab))
    weights = get_weights(build_model(config, seed=5))
    save_bundle(tmp_path / "bundle", config, vocab, weights, model_version=0,
                meta={"source": "test", "data": {"population": "donors"}})  # models.pretrained's meta
    init = client_data.prepare(ds, preset_name="tiny", population="federated", init_bundle=str(tmp_path / "bundle"))
    assert init.vocab == vocab and init.vocab_source == "bundle" and init.model_config == config
    assert init.summary()["init_bundle"]["population"] == "donors"  # whose text trained the starting model
    assert all(np.array_equal(a, b) for a, b in zip(init.initial_weights, weights))
    with pytest.raises(ValueError, match="preset"):
        client_data.prepare(ds, preset_name="small", init_bundle=str(tmp_path / "bundle"))

    # flags; the defaults keep every existing run's config hash
    cfg = parse_args(["--population", "federated", "--vocab-source", "wordfreq", "--preset", "tiny"])
    assert (cfg.population, cfg.vocab_source, cfg.init_bundle) == ("federated", "wordfreq", None)
    assert "population" not in SimConfig().identity() and "init_bundle" not in SimConfig().identity()
    assert cfg.config_hash() != SimConfig(preset="tiny").config_hash()
    assert parse_args(["--init-bundle", "b"]).init_bundle == "b"
    with pytest.raises(ValueError):
        SimConfig(init_bundle="b", vocab_source="donors")
    with pytest.raises(SystemExit):
        parse_args(["--population", "everyone"])


def test_fleet_population_replays_only_those_users(toy):
    from device_app.fleet import Fleet, FleetConfig

    def users(population: str, n: int = 30) -> list[str]:
        fleet = Fleet(FleetConfig(server_url="http://127.0.0.1:9", n_devices=n, population=population), dataset=toy)
        return [cid for cid, _ in fleet._load_users()]

    assert set(users("federated")) <= set(toy.federated_ids) and len(set(users("federated"))) == 30
    assert set(users("donors")) == set(toy.donor_ids)  # 5 donors, replayed in turn
    everyone = users("all", 54)
    assert sorted(everyone) == toy.train_ids  # today's choice: every training user
    assert users("federated", 54) != everyone


def test_fleet_cli_and_demo_pass_the_population(tmp_path, monkeypatch):
    from device_app.__main__ import build_parser as device_parser
    from scripts import demo
    from scripts.demo_settings import QUICK, Settings, build_parser

    args = device_parser().parse_args(["--headless", "--fleet", "3", "--population", "federated"])
    assert args.population == "federated"
    assert device_parser().parse_args(["--headless", "--fleet", "3"]).population == "all"

    assert Settings().population == "federated"  # the demo replays only the federated users (its start: donors)
    dargs = build_parser().parse_args(["--population", "federated", "--out", str(tmp_path / "run")])
    settings = Settings(**{**Settings().public(), **QUICK, "population": dargs.population})
    d = demo.Demo(dargs, settings)
    d.url = "http://127.0.0.1:9"
    spawned: dict[str, list[str]] = {}

    class Spawned(Exception):
        pass

    def spawn(name, cmd, echo=None):
        spawned[name] = cmd
        raise Spawned

    class FakeAdmin:
        def get(self, path, params=None):
            return {"global_version": 1}

    monkeypatch.setattr(d.sup, "spawn", spawn)
    d.admin = FakeAdmin()
    for step in (d.pretrain, d.start_fleet):
        with pytest.raises(Spawned):
            step()
    tff, fleet = spawned["tff"], spawned["fleet"]
    assert tff[tff.index("--population") + 1] == "donors" and "--max-train-clients" not in tff
    assert fleet[fleet.index("--population") + 1] == "federated"
    assert demo.main(["--population", "donors", "--out", str(tmp_path / "bad")]) == 2


def test_data_cli_prints_the_split_and_oov_per_source(tmp_path, capsys):
    from models.data.__main__ import main as data_main

    root = tmp_path / "texts"
    root.mkdir()
    for i in range(30):
        (root / f"u{i:02d}.txt").write_text(" ".join(_items(i)) + "\n", encoding="utf-8")
    assert data_main(["donors", "--dataset", str(root), "--sizes", "50"]) == 0
    out = capsys.readouterr().out
    assert "30 training clients = 3 donors" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["all", "donors", "wordfreq"]
