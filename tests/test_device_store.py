"""Device text store (SQLite, cap, held-back split, forget) and eligibility: no TensorFlow."""
from __future__ import annotations

from pathlib import Path

import pytest

from device_app.eligibility import EligibilityMonitor, EligibilitySettings
from device_app.store import TextStore


def _raw_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for this database."""
    out = b""
    for suffix in ("", "-journal", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            out += p.read_bytes()
    return out


def test_messages_are_stored_in_order_and_blank_ones_ignored(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "text.db")
    assert store.add("hello there")
    assert not store.add("   ")
    assert store.add("  second message  ")
    assert store.messages() == ["hello there", "second message"]
    assert store.messages(limit=1) == ["second message"]
    assert store.count() == 2
    store.close()
    reopened = TextStore(tmp_path / "text.db")
    assert reopened.messages() == ["hello there", "second message"]


def test_size_cap_evicts_the_oldest_messages_and_overwrites_them(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "text.db", max_chars=100)
    store.add("oldest-canary-" + "x" * 30)
    for i in range(10):
        store.add(f"message number {i:02d} " + "y" * 10)
    assert store.total_chars() <= 100
    msgs = store.messages()
    assert msgs[-1].startswith("message number 09")
    assert not any("oldest-canary" in m for m in msgs)
    # secure_delete: the evicted text is gone from the file, not just unlinked from the table.
    assert b"oldest-canary" not in _raw_bytes(tmp_path / "text.db")


def test_ids_keep_growing_for_new_message_counts(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "text.db")
    for i in range(5):
        store.add(f"m{i}")
    mark = store.last_id()
    store.add("new one")
    store.add("new two")
    assert store.count_since(mark) == 2


def test_most_recent_messages_are_held_back(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "text.db", holdout_fraction=0.2)
    assert store.split().heldout == []
    store.add("only one")
    assert store.split().train == ["only one"] and store.split().heldout == []
    for i in range(9):
        store.add(f"message {i}")
    split = store.split()
    assert split.heldout == ["message 7", "message 8"]
    assert split.train[0] == "only one" and len(split.train) == 8


def test_forget_really_deletes_the_text(tmp_path: Path) -> None:
    db = tmp_path / "text.db"
    store = TextStore(db)
    for i in range(50):
        store.add(f"my secret canary phrase number {i}")
    assert b"secret canary" in _raw_bytes(db)
    store.forget()
    assert store.count() == 0
    assert b"secret canary" not in _raw_bytes(db)
    store.add("after forgetting")
    assert store.messages() == ["after forgetting"]


def test_eligibility_from_settings_battery_and_typing() -> None:
    now = [1000.0]
    settings = EligibilitySettings(idle_after_s=30.0)
    battery: list[bool | None] = [None]
    monitor = EligibilityMonitor(settings, battery_probe=lambda: battery[0], clock=lambda: now[0])
    assert monitor.current().eligible
    assert monitor.current().conditions() == {"charging": True, "unmetered": True, "idle": True}

    battery[0] = False  # a laptop on battery is not charging whatever the setting says
    assert not monitor.current().charging
    assert "not charging" in monitor.current().reasons()
    battery[0] = True
    assert monitor.current().charging
    settings.use_battery_sensor = False
    settings.charging = False
    assert not monitor.current().charging
    settings.charging = True

    monitor.note_activity()  # typing: not idle for idle_after_s
    assert not monitor.current().idle
    now[0] += 31
    assert monitor.current().idle

    settings.unmetered = False
    assert not monitor.current().eligible
    settings.unmetered = True
    settings.participate = False
    e = monitor.current()
    assert not e.eligible and e.reasons() == ["participation is off"]


def test_eligibility_settings_round_trip() -> None:
    s = EligibilitySettings(participate=False, idle_after_s=5)
    assert EligibilitySettings.from_dict({**s.to_dict(), "unknown": 1}) == s


@pytest.mark.parametrize("bad", [{"max_chars": 0}, {"holdout_fraction": 1.0}])
def test_store_rejects_bad_settings(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        TextStore(tmp_path / "x.db", **bad)


def test_headless_client_imports_neither_kivy_nor_tensorflow() -> None:
    """Kivy stays inside device_app/ui; TensorFlow loads only when a model is used."""
    import subprocess
    import sys

    code = ("import sys; import device_app.client, device_app.fleet, device_app.worker, device_app.__main__; "
            "bad = [m for m in ('kivy', 'tensorflow') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
