"""The Kivy app rendered offscreen (SDL's offscreen video driver, or Xvfb if there is a display):
a screenshot of the right size, not blank, whose suggestion buttons show the model's
suggestions for the typed text; and a scripted session on the on-screen keys (typing, tapping a
suggestion that replaces the partial word, sending). Each runs in a subprocess so Kivy's window
never lives in the pytest process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from device_app.model_state import ModelState
from device_app.testing import SAMPLE_MESSAGES, make_bundle

ROOT = Path(__file__).resolve().parents[1]
PIL = pytest.importorskip("PIL.Image")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(KIVY_NO_ARGS="1", KIVY_HOME=str(tmp_path / "kivy-home"), KIVY_WINDOW="sdl2", KIVY_NO_FILELOG="1",
               SDL_VIDEODRIVER="offscreen", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("DISPLAY", None)
    return env


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("ui") / "bundle", SAMPLE_MESSAGES)


@pytest.mark.parametrize("text", ["see you to", "the tortoise "])
def test_screenshot_shows_the_models_suggestions(tmp_path: Path, bundle_dir: Path, text: str) -> None:
    png = tmp_path / "shot.png"
    cmd = [sys.executable, "-m", "device_app", "--data-dir", str(tmp_path / "device"), "--bundle", str(bundle_dir),
           "--screenshot", str(png), "--type", text, "--size", "360x640"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shown["ready"] and shown["text"] == text

    image = PIL.open(png).convert("RGB")
    assert image.size == (360, 640) and tuple(shown["size"]) == (360, 640)
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 20, "screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "screenshot has almost no detail"

    expected = ModelState(tmp_path / "expected", initial_bundle=bundle_dir).suggest(text, 3)
    assert len(expected) == 3
    assert shown["suggestions"] == expected  # the buttons show the model's suggestions, best first
    # Gboard's layout: the top suggestion in the middle slot, and that slot (only) in bold.
    slots = shown["slots"]
    assert [s["rank"] for s in slots] == [2, 1, 3]
    assert [s["bold"] for s in slots] == [False, True, False]
    assert slots[1]["text"] == expected[0]


def test_status_screen_renders(tmp_path: Path, bundle_dir: Path) -> None:
    png = tmp_path / "status.png"
    cmd = [sys.executable, "-m", "device_app", "--data-dir", str(tmp_path / "device"), "--bundle", str(bundle_dir),
           "--screenshot", str(png), "--status-screen"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image = np.asarray(PIL.open(png).convert("RGB"), dtype=np.float32)
    assert image.shape == (640, 360, 3) and image.std() > 20


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from device_app.client import DeviceClient
    from device_app.ui.app import configure_kivy, _build_app_class
    configure_kivy((360, 640))
    from kivy.clock import Clock

    client = DeviceClient(sys.argv[1], initial_bundle=sys.argv[2])
    app = _build_app_class()(client, start_worker=False)
    out = {}
    plan = []

    def step(dt):
        if not plan:
            Clock.unschedule(step)
            app.stop()
            return
        name, fn, need_ready = plan[0]
        if need_ready and not app.suggestions_ready():
            return
        plan.pop(0)
        fn()

    def type_keys():
        for ch in "See you Tomo":
            app.key("space" if ch == " " else ch)

    def pick():
        out["typed"] = app.typing.input.text
        out["before_pick"] = app.typing.strip.words
        out["expected_before_pick"] = client.suggest(out["typed"])
        out["picked"] = "Tomorrow" if "Tomorrow" in out["before_pick"] else out["before_pick"][0]
        app.pick(out["picked"])

    def after_pick():
        out["after_pick_text"] = app.typing.input.text
        out["after_pick"] = app.typing.strip.words
        out["expected_after_pick"] = client.suggest(out["after_pick_text"])
        app.key("del"); app.key("del")
        out["after_delete"] = app.typing.input.text

    def send():
        out["after_delete_suggestions"] = app.typing.strip.words
        out["expected_after_delete"] = client.suggest(out["after_delete"])
        app.key("send")
        out["after_send_text"] = app.typing.input.text
        out["stored"] = client.store.messages()

    plan += [("type", type_keys, False), ("pick", pick, True), ("after", after_pick, True), ("send", send, True)]
    Clock.schedule_interval(step, 0.05)
    app.run()
    print(json.dumps(out))
    """
)


def test_typing_tapping_a_suggestion_and_sending(tmp_path: Path, bundle_dir: Path) -> None:
    script = tmp_path / "drive.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "device"), str(bundle_dir)], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["typed"] == "See you Tomo"
    assert out["before_pick"] == out["expected_before_pick"] and "Tomorrow" in out["before_pick"]
    # The tapped suggestion replaced the partial word "tomo" and added a space; suggestions refreshed.
    assert out["after_pick_text"] == "See you Tomorrow "
    assert out["after_pick"] == out["expected_after_pick"]
    assert out["after_delete"] == "See you Tomorro"
    assert out["after_delete_suggestions"] == out["expected_after_delete"]
    # Sending stores the message on the device and clears the field.
    assert out["after_send_text"] == "" and out["stored"] == ["See you Tomorro"]
