"""models.data: splits, held-out clients, no-leakage guarantee, loaders, stats."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.data import FederatedDataset, load_dataset, load_text_files
from models.data.__main__ import main as data_main
from models.data.chitchat import load_chitchat, message_issue, read_messages
from models.data.shakespeare import load_shakespeare, parse_play, role_sentences
from models.data.split import build_federated, choose_heldout, dedupe_key, num_test_items, split_by_time
from models.data.stats import dataset_stats, format_stats

ROOT = Path(__file__).resolve().parents[1]
JUNK_SENDER = "60576dcf-5b39-4420-a850-33ff7d108047"  # thousands of "a a a a a"
KEYMASH_SENDER = "b35b7dec-8318-4de2-943c-9ca45857af70"  # ~950 lone letters "a", "f", "d"


def digest(ds: FederatedDataset) -> str:
    """Everything that defines the splits, as one hash."""
    blob = json.dumps(
        [ds.train_ids, ds.heldout_ids, [[c.client_id, c.train, c.test] for c in ds.clients.values()]],
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def chitchat() -> FederatedDataset:
    return load_chitchat(seed=0)


# --- split rules -------------------------------------------------------------

def test_num_test_items_is_a_rounded_fifth_with_at_least_one():
    assert [num_test_items(n) for n in (0, 1, 2, 4, 5, 7, 8, 10, 100)] == [0, 0, 1, 1, 1, 1, 2, 2, 20]


def test_split_is_by_position_and_train_drops_copies_of_test():
    items = ["hi", "how are you", "LOL", "good", "fine thanks", "lol ", "bye"]
    train, test, removed = split_by_time(items, 0.3)
    assert test == ["lol ", "bye"]  # the last 30% (2 of 7), in time order
    assert train == ["hi", "how are you", "good", "fine thanks"]  # "LOL" repeats test item "lol "
    assert removed == 1


def test_heldout_choice_is_seeded_and_order_independent():
    ids = [f"user{i}" for i in range(200)]
    a = choose_heldout(ids, 0.1, seed=0)
    assert len(a) == 20 and a == sorted(a)
    assert choose_heldout(list(reversed(ids)), 0.1, seed=0) == a
    assert choose_heldout(ids, 0.1, seed=1) != a


def test_build_federated_drops_small_clients_and_keeps_ids_disjoint():
    items = {f"c{i}": [f"sentence {i} {j}" for j in range(i)] for i in range(12)}
    ds = build_federated("toy", items, min_items=5, heldout_fraction=0.25, seed=3)
    assert sorted(ds.clients) == sorted(f"c{i}" for i in range(5, 12))
    assert ds.dropped["clients"]["too_few_items"] == 5
    assert not set(ds.train_ids) & set(ds.heldout_ids)
    assert sorted(ds.train_ids + ds.heldout_ids) == sorted(ds.clients)
    assert len(ds.heldout_ids) == 2  # round(0.25 * 7)
    with pytest.raises(TypeError):  # ids are keyword-only: a positional swap must not pass silently
        FederatedDataset("toy", ds.clients, ds.heldout_ids, ds.train_ids)  # type: ignore[misc]
    with pytest.raises(ValueError):
        FederatedDataset("toy", ds.clients, train_ids=ds.train_ids, heldout_ids=ds.train_ids[:1])


def test_subset_is_deterministic_and_nested(chitchat):
    small = chitchat.subset(n_clients=20, n_heldout=3)
    assert len(small.train_ids) == 20 and len(small.heldout_ids) == 3
    assert set(small.train_ids) <= set(chitchat.train_ids)
    assert set(small.heldout_ids) <= set(chitchat.heldout_ids)
    assert small.train_ids == chitchat.subset(n_clients=20, n_heldout=3).train_ids
    assert set(chitchat.subset(n_clients=19).train_ids) < set(small.train_ids)
    picked = chitchat.subset(ids=[chitchat.train_ids[0], chitchat.heldout_ids[0]])
    assert picked.train_ids == [chitchat.train_ids[0]] and picked.heldout_ids == [chitchat.heldout_ids[0]]


# --- chitchat ----------------------------------------------------------------

def test_message_issue_rules():
    assert message_issue("a a a a a a") == "repeated_word"
    assert message_issue("ha ha ha ha ha") == "repeated_word"
    assert message_issue("  ") == "empty"
    assert message_issue("f") == "lone_letter"
    for fine in ("lol", "?", ":)", "k k", "no no no, not that one", "I know, right?"):
        assert message_issue(fine) is None, fine


def test_chitchat_numbers_are_sane(chitchat):
    d = chitchat.dropped
    assert d["clients_before"] == 1315
    assert d["items_before"] == 258_145
    assert [s["id"] for s in d["junk_senders"]] == [JUNK_SENDER, KEYMASH_SENDER]
    assert JUNK_SENDER not in chitchat.clients and KEYMASH_SENDER not in chitchat.clients
    assert d["clients"]["too_few_items"] == 329
    assert 950 <= len(chitchat.clients) <= 1000
    assert len(chitchat.heldout_ids) == round(0.1 * len(chitchat.clients))
    words = sum(len(s.split()) for c in chitchat.clients.values() for s in (*c.train, *c.test))
    assert 2_200_000 < words < 2_500_000
    # No kept message is junk of the removed kinds.
    for c in chitchat.clients.values():
        assert all(message_issue(m) not in ("empty", "repeated_word") for m in (*c.train, *c.test))


def test_chitchat_heldout_disjoint_from_train(chitchat):
    assert not set(chitchat.train_ids) & set(chitchat.heldout_ids)
    assert sorted(chitchat.train_ids + chitchat.heldout_ids) == sorted(chitchat.clients)
    heldout_text = set(chitchat.heldout_sentences())
    assert heldout_text and len(chitchat.all_train_sentences()) > 150_000
    # all_train_sentences draws only on training clients.
    assert len(chitchat.all_train_sentences()) == sum(len(chitchat[c].train) for c in chitchat.train_ids)


def test_chitchat_split_is_time_ordered_without_leakage(chitchat):
    """The documented guarantee: test = each sender's latest messages; no train message of a
    client equals (case-folded, whitespace-collapsed) one of its test messages."""
    ordered = read_messages()
    for cid, client in chitchat.clients.items():
        assert client.test and client.train
        assert not {dedupe_key(t) for t in client.train} & {dedupe_key(t) for t in client.test}, cid
        kept = [m for m in ordered[cid] if message_issue(m) not in ("empty", "repeated_word")]
        assert client.test == kept[len(kept) - len(client.test):]
        assert len(client.test) == num_test_items(len(kept))
        # train is the earlier messages, in order, minus copies of test messages
        it = iter(kept[: len(kept) - len(client.test)])
        assert all(any(m == t for m in it) for t in client.train)


def test_chitchat_is_deterministic_across_loads_and_seeds(chitchat):
    again = load_chitchat(seed=0)
    assert digest(again) == digest(chitchat)
    other = load_chitchat(seed=1)
    assert other.heldout_ids != chitchat.heldout_ids
    assert sorted(other.clients) == sorted(chitchat.clients)  # the seed only picks held-out clients


def test_chitchat_is_deterministic_across_processes(chitchat):
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.test_data import digest; from models.data import load_dataset;"
        "print(digest(load_dataset('chitchat', seed=0)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(chitchat)


# --- shakespeare ---------------------------------------------------------------

PLAY = """# A Test Play

## ACT I

### SCENE I. A heath.
spill-over of the heading.

_Enter FIRST WITCH and
SECOND WITCH_

**FIRST WITCH**  
When shall we three meet again  
In thunder, lightning, or in rain?  
_\\[Aside]_ Fair is foul.

*Thunder. Exit
all but one.*

And foul is fair\\--hover.

**SECOND WITCH**  
[Within]_  
_Aside_ Anon!  
1\\. Paddock calls.

## ACT II

Nobody speaks this.

**FIRST WITCH**  
Hail!
"""


def test_parse_play_handles_speakers_directions_and_escapes():
    assert parse_play(PLAY) == [
        ("FIRST WITCH", "When shall we three meet again In thunder, lightning, or in rain? Fair is foul. "
                        "And foul is fair--hover."),
        ("SECOND WITCH", "Anon! 1. Paddock calls."),
        ("FIRST WITCH", "Hail!"),
    ]
    roles = role_sentences(PLAY, "test-play")
    assert roles["test-play/FIRST WITCH"] == [
        "When shall we three meet again In thunder, lightning, or in rain?",
        "Fair is foul.",
        "And foul is fair--hover.",
        "Hail!",
    ]


def test_real_play_othello():
    ds = load_shakespeare(plays=["othello"], heldout_fraction=0.0)
    assert {"othello/IAGO", "othello/OTHELLO", "othello/DESDEMONA"} <= set(ds.clients)
    iago = ds["othello/IAGO"]
    assert iago.train[0].startswith("'Sblood, but you will not hear me")
    assert len(iago.train) > 300 and len(iago.test) > 80
    for client in ds.clients.values():
        for s in (*client.train, *client.test):
            assert not any(mark in s for mark in ("**", "_", "\\", "[", "#")), s
            assert not s.startswith(("Enter ", "Exit", "Exeunt", "Re-enter")), s
    assert all(len(c) >= 10 for c in ds.clients.values())


# --- text files, dispatch, stats ------------------------------------------------

def test_text_files_one_client_and_folder(tmp_path):
    body = "\n\n".join(f"Paragraph {i} starts here\nand wraps. Second sentence {i}!" for i in range(5))
    (tmp_path / "a.txt").write_text(body, encoding="utf-8")
    (tmp_path / "b.txt").write_text("Just one line.\nAnd another one.\nAnd a third.", encoding="utf-8")
    (tmp_path / "tiny.txt").write_text("Alone.", encoding="utf-8")

    ds = load_text_files(tmp_path / "a.txt")
    me = ds["me"]
    assert ds.train_ids == ["me"] and ds.heldout_ids == []
    assert me.train[0] == "Paragraph 0 starts here and wraps."
    assert len(me.test) == 2 and me.test[-1] == "Second sentence 4!"

    folder = load_dataset(str(tmp_path))
    assert sorted(folder.clients) == ["a.txt", "b.txt"]
    assert folder.dropped["clients"]["too_few_items"] == 1

    both = load_text_files([tmp_path / "a.txt", tmp_path / "b.txt"], client_id="alice")
    assert list(both.clients) == ["alice"] and len(both["alice"]) == 13
    with pytest.raises(ValueError):
        load_text_files(tmp_path / "tiny.txt")
    with pytest.raises(ValueError):
        load_dataset("no-such-dataset")


def test_stats_table_and_json(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"user{i}.txt").write_text(
            "\n".join(f"User {i} writes message number {j}." for j in range(10)) + "\nA rare zyzzyva word.",
            encoding="utf-8",
        )
    ds = load_dataset(str(tmp_path), heldout_fraction=0.34)
    stats = dataset_stats(ds, vocab_size=5)
    assert stats["clients"] == {"before_filters": 3, "kept": 3, "train": 2, "heldout": 1, "dropped": 0}
    assert stats["examples"] == 33
    assert stats["vocab"]["size"] == 9
    assert 0 < stats["oov"]["train"]["oov_rate"] < stats["oov"]["test"]["oov_rate"] <= 1
    table = format_stats(stats)
    assert "OOV test" in table and "held out" in table

    assert data_main(["stats", "--dataset", str(tmp_path), "--vocab-size", "50", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["clients"]["kept"] == 3 and printed["vocab"]["requested"] == 50


def test_stats_on_shakespeare_play():
    stats = dataset_stats(load_shakespeare(plays=["macbeth", "othello"]), vocab_size=2000)
    assert stats["clients"]["kept"] == stats["clients"]["train"] + stats["clients"]["heldout"]
    assert stats["oov"]["train"]["oov_rate"] < stats["oov"]["heldout"]["oov_rate"]
    assert stats["examples_per_client"]["min"] >= 10
