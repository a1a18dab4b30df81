"""The demo's last stage: a held-out user's device personalizes the newest global model, then the
Kivy keyboard is rendered with a suggestion (offscreen unless a display is there and the app is asked for)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from scripts.console import say
from scripts.errors import DemoError
from scripts.supervisor import Child, Supervisor, check_alive


def run_keyboard_stage(sup: Supervisor, server: Child | None, url: str, run_dir: Path, seed: int, open_app: bool,
                       summary: dict[str, Any]) -> None:
    """Personalize, screenshot (and open the app when asked); fills summary["personalization"] and
    summary["screenshot"] as each step succeeds."""
    device_dir = run_dir / "device"
    # the server's registration key, as the demo hands it to its children (saved in the device's settings)
    text = _personalize(url, device_dir, seed, summary, sup.env.get("FK_REGISTRATION_KEY"))
    shot = run_dir / "keyboard.png"
    cmd = [sys.executable, "-m", "device_app", "--data-dir", str(device_dir), "--screenshot", str(shot), "--type", text]
    env = {}
    if not open_app:
        env = {"DISPLAY": "", "WAYLAND_DISPLAY": ""}  # render offscreen
    child = sup.spawn("keyboard", cmd, echo=lambda line: line if ("Error" in line or "Traceback" in line) else None,
                      env=env)
    while child.alive:
        check_alive(server)
        time.sleep(0.2)
    child.reader.join(5)
    if child.proc.returncode != 0 or not shot.exists():
        raise DemoError(f"the keyboard screenshot failed (log {child.log_path}):\n" + "\n".join(child.lines[-10:]))
    shown = None
    for line in reversed(child.lines):
        if line.startswith("{"):
            try:
                shown = json.loads(line).get("suggestions")
            except ValueError:
                pass
            break
    say(f"keyboard rendered offscreen with {text!r} typed, suggestions {shown}: {shot}")
    summary["screenshot"] = str(shot)
    if open_app and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        say("opening the keyboard (close its window to finish)")
        app = sup.spawn("app", [sys.executable, "-m", "device_app", "--data-dir", str(device_dir), "--server", url])
        while app.alive:
            time.sleep(0.3)
    elif open_app:
        say("no display: the keyboard window cannot open; see the screenshot above")


def _personalize(url: str, device_dir: Path, seed: int, summary: dict[str, Any],
                 registration_key: str | None = None) -> str:
    """A held-out user (never trained on) types their messages on a headless device, which downloads the
    global model and personalizes it; returns the text to show typed on the keyboard."""
    from device_app.client import DeviceClient
    from device_app.personalize import describe_gain, describe_serving
    from models.data import load_dataset

    ds = load_dataset("chitchat", seed=seed)
    # a held-out user (never trained on), the one with the most messages
    uid = max(sorted(ds.heldout_ids), key=lambda c: len(ds.clients[c].train) + len(ds.clients[c].test))
    user = ds.clients[uid]
    messages = [*user.train, *user.test][:600]
    client = DeviceClient(device_dir, url, initial_bundle=False, seed=seed, registration_key=registration_key)
    try:
        for m in messages:
            client.commit(m, typed_now=False)
        if not client.sync():
            raise DemoError(f"the device could not download the global model: {client.last_error}")
        say(f"a held-out user typed {len(messages)} messages; the device has global version "
            f"{client.models.global_version}")
        gain = client.personalize()
        if gain is None:
            raise DemoError(f"personalization failed: {client.last_error}")
        say(f"top-1 on the user's {gain['heldout_messages']} held-back messages: " + ", ".join(describe_gain(gain))
            + f" ({gain['train_messages']} trained on, {gain['seconds']:.1f} s)")
        text, want, personal, global_ = pick_text(client)
        say(f"the keyboard serves {describe_serving(client.status()['model'])}: {gain['reason']} (the personal "
            "typing cache of the user's messages stays on the device)")
        say(f"typing {text!r}: the keyboard suggests {personal} (the global model alone: {global_})"
            + (f" (the user went on with {want!r})" if want else ""))
        summary["personalization"] = {"user": uid, "messages": len(messages), "gain": gain, "text": text,
                                      "next_word": want, "personal": personal, "global": global_}
    finally:
        client.close()
    return text


def pick_text(client: Any) -> tuple[str, str | None, list[str], list[str]]:
    """A prefix of one of the user's held-back messages whose next word the personal model suggests."""
    from models.tokenizer import tokenize

    held = client.store.split().heldout
    fallback = None
    for msg in held[:200]:
        words = msg.split()
        for cut in range(2, min(len(words), 8)):
            text = " ".join(words[:cut]) + " "
            want = tokenize(words[cut])[:1]
            if not want:
                continue
            personal = client.suggest(text)
            if fallback is None:
                fallback = (text, want[0], personal)
            if want[0] in personal[:3] and len(want[0]) > 2:
                client.set_use_personal(False)
                global_ = client.suggest(text)
                client.set_use_personal(True)
                return text, want[0], personal, global_
    text, want, personal = fallback or ("see you ", None, client.suggest("see you "))
    client.set_use_personal(False)
    global_ = client.suggest(text)
    client.set_use_personal(True)
    return text, want, personal, global_
