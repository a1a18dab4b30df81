"""The Kivy keyboard app: a portrait window with the text being typed, a strip of three
suggestions and an on-screen keyboard (the physical keyboard types too), plus a status screen.

Nothing slow runs on the UI thread: suggestions are computed on their own thread (a stale
result is discarded when newer text exists), training and network run in the BackgroundWorker,
and results hop back with Clock.schedule_once.

    run(client)                                   # open the window
    screenshot(client, "shot.png", text="see you to")   # render once, save, return what was shown

Kivy is configured here before it is imported (window size, no argv parsing, and the
"offscreen" SDL video driver when there is no display), so call these functions rather than
importing the screens first.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from device_app.client import DeviceClient
from device_app.transport import TransportPolicyError
from device_app.worker import BackgroundWorker

_configured = False


def configure_kivy(size: tuple[int, int] = (360, 640)) -> None:
    """Environment and Config for Kivy; must run before kivy.core.window is imported."""
    global _configured
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    os.environ.setdefault("KIVY_NO_CONSOLELOG", "1")
    os.environ.setdefault("KIVY_NO_FILELOG", "1")
    os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")  # leave Python's logging configuration alone
    os.environ.setdefault("KIVY_HOME", os.path.join(tempfile.gettempdir(), "fk-kivy-home"))
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
        os.environ.setdefault("KIVY_WINDOW", "sdl2")
    if _configured:
        return
    import logging

    from kivy.config import Config
    from kivy.logger import Logger

    if not logging.getLogger().isEnabledFor(logging.INFO):
        Logger.setLevel(logging.WARNING)
    Config.set("graphics", "width", str(size[0]))
    Config.set("graphics", "height", str(size[1]))
    Config.set("graphics", "resizable", "1")
    Config.set("input", "mouse", "mouse,disable_multitouch")
    Config.set("kivy", "exit_on_escape", "0")
    _configured = True


def _build_app_class():
    from kivy.app import App
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.uix.screenmanager import NoTransition, ScreenManager

    from device_app.ui.screens import StatusScreen, TypingScreen

    class KeyboardApp(App):
        title = "Federated keyboard"

        def __init__(self, client: DeviceClient, *, interval_s: float = 30.0, start_worker: bool = True, **kw: Any) -> None:
            super().__init__(**kw)
            self.client = client
            self.worker = BackgroundWorker(client, interval_s=interval_s, auto=start_worker)
            self.start_worker = start_worker
            self._suggest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suggest")
            self._generation = 0
            self._shown_generation = -1
            self._shown_for: str | None = None
            self.typing: Any = None
            self.status_screen: Any = None
            self.note = ""

        # -------------------------------------------------------------- build
        def build(self):
            Window.clearcolor = (0.09, 0.10, 0.12, 1)
            sm = ScreenManager(transition=NoTransition())
            self.typing = TypingScreen(on_status=lambda: setattr(sm, "current", "status"))
            self.status_screen = StatusScreen(
                on_back=lambda: setattr(sm, "current", "typing"),
                on_action=self.action,
                on_switch=self.switch,
                on_server=self.set_server,
            )
            sm.add_widget(self.typing)
            sm.add_widget(self.status_screen)
            self.sm = sm
            t = self.typing
            # One suggestion request per frame, after the cursor has moved too.
            self._suggest_trigger = Clock.create_trigger(lambda dt: self.request_suggestions())
            t.input.bind(text=lambda *_: self.text_changed())
            t.input.bind(cursor=lambda *_: self._suggest_trigger())
            t.input.bind(on_text_validate=lambda *_: self.send())
            t.keys.bind(on_key=lambda _w, key: self.key(key))
            t.strip.bind(on_pick=lambda _w, word: self.pick(word))
            t.show_history(self.client.store.messages(limit=6))
            self.worker.add_listener(self._job_done)
            self.client.add_progress_listener(lambda f, msg: Clock.schedule_once(lambda dt: self._show_progress(f, msg)))
            Clock.schedule_interval(self.refresh_status, 0.5)
            return sm

        def on_start(self) -> None:
            self.typing.input.focus = True
            self.request_suggestions()
            if self.start_worker:
                self.worker.start()

        def on_stop(self) -> None:
            self.worker.stop(timeout=10.0)
            self._suggest_pool.shutdown(wait=False, cancel_futures=True)

        # -------------------------------------------------------------- typing
        def text_before_cursor(self) -> str:
            ti = self.typing.input
            return ti.text[: ti.cursor_index()]

        def text_changed(self) -> None:
            self.client.note_keystroke()
            self._suggest_trigger()

        def request_suggestions(self) -> None:
            """Compute suggestions off the UI thread; only the newest request is shown."""
            self._generation += 1
            generation, text = self._generation, self.text_before_cursor()

            def work() -> None:
                try:
                    words = self.client.suggest(text, 3)
                except Exception as exc:  # noqa: BLE001 - a bad model must not kill the keyboard
                    words = []
                    self.note = f"suggestions failed: {exc}"
                Clock.schedule_once(lambda dt: self._show_suggestions(generation, text, words))

            self._suggest_pool.submit(work)

        def _show_suggestions(self, generation: int, text: str, words: list[str]) -> None:
            if generation < self._shown_generation or generation != self._generation:
                return  # a newer request is on its way
            self._shown_generation = generation
            self._shown_for = text
            self.typing.strip.show(words)

        def suggestions_ready(self) -> bool:
            return self._shown_generation == self._generation and self._shown_for == self.text_before_cursor()

        def pick(self, word: str) -> None:
            """A tapped suggestion replaces the partial word (models.suggest.apply_suggestion)."""
            ti = self.typing.input
            before, after = ti.text[: ti.cursor_index()], ti.text[ti.cursor_index():]
            new_before = self.client.apply_suggestion(before, word)
            ti.text = new_before + after.lstrip(" ")
            ti.cursor = ti.get_cursor_from_index(len(new_before))

        def key(self, key: str) -> None:
            """An on-screen key: edit at the cursor (the physical keyboard goes through TextInput)."""
            if key == "send":
                self.send()
                return
            ti = self.typing.input
            if ti.selection_text:
                ti.delete_selection()
            text, i = ti.text, ti.cursor_index()
            if key == "del":
                if i == 0:
                    return
                text, i = text[: i - 1] + text[i:], i - 1
            else:
                char = " " if key == "space" else key
                text, i = text[:i] + char + text[i:], i + len(char)
            ti.text = text  # (TextInput.insert_text ignores an empty field before its first layout)
            ti.cursor = ti.get_cursor_from_index(i)

        def send(self) -> None:
            """Enter/send: the message is stored on the device (only there) and the field clears."""
            ti = self.typing.input
            text = ti.text.strip()
            if text:
                self.client.commit(text)
                self.typing.show_history(self.client.store.messages(limit=6))
            ti.text = ""
            ti.focus = True

        # -------------------------------------------------------------- status
        def action(self, job: str) -> None:
            if job == "forget":
                self._confirm_forget()
                return
            self.worker.submit(job)
            if not self.start_worker:
                self.worker.start()

        def _confirm_forget(self) -> None:
            from kivy.uix.boxlayout import BoxLayout
            from kivy.uix.button import Button
            from kivy.uix.label import Label
            from kivy.uix.popup import Popup

            box = BoxLayout(orientation="vertical", spacing=8, padding=8)
            box.add_widget(Label(text="Delete everything typed on this device\nand the personal model?", halign="center"))
            row = BoxLayout(size_hint_y=None, height=44, spacing=8)
            popup = Popup(title="Forget my data", content=box, size_hint=(0.9, 0.4))
            yes, no = Button(text="Delete"), Button(text="Cancel")
            yes.bind(on_release=lambda *_: (popup.dismiss(), self.worker.submit("forget"),
                                            None if self.start_worker else self.worker.start()))
            no.bind(on_release=lambda *_: popup.dismiss())
            row.add_widget(no)
            row.add_widget(yes)
            box.add_widget(row)
            popup.open()

        def switch(self, key: str, value: bool) -> None:
            if key == "use_personal":
                self.client.set_use_personal(value)
                self.request_suggestions()
            else:
                self.client.set_participation(**{key: value})

        def set_server(self, url: str) -> None:
            try:
                self.client.set_server_url(url)
            except TransportPolicyError as exc:  # e.g. plain http:// to another machine: say why
                self.status_screen.note.text = str(exc)
                return
            self.worker.submit("sync")

        def _job_done(self, job: str, result: Any, error: BaseException | None) -> None:
            def show(dt: float) -> None:
                if error is not None:
                    self.status_screen.note.text = f"{job} failed: {error}"
                elif job == "forget":
                    self.status_screen.note.text = "Your typed text and personal model were deleted."
                    self.typing.show_history([])
                elif job == "train_now":
                    self.status_screen.note.text = f"round: {result.get('round') or 'not joined'}"
                elif job == "sync":
                    self.status_screen.note.text = "new model installed" if result else "model is up to date"
                self.request_suggestions()  # a new model may suggest differently

            Clock.schedule_once(show)

        def _show_progress(self, fraction: float, message: str) -> None:
            p = self.typing.progress
            busy = bool(message)
            p.opacity = 1 if busy else 0
            p.value = fraction if busy else 0.0

        def refresh_status(self, dt: float = 0.0) -> None:
            c = self.client
            if self.sm.current == "status":
                status = c.status()
                self.status_screen.update(status, self.worker.current)
                conn, gv, model = status.get("connection"), status.get("global_version"), status.get("model") or {}
            else:  # the typing screen's badge only: no battery probe (psutil) or store count twice a second
                conn, gv, model = c.connection, c.models.global_version, c.models.status()
            cache = "+cache" if (model.get("cache") or {}).get("weight") else ""
            self.typing.badge.text = f"{conn} | " + ("no model" if gv is None else f"v{gv} {model.get('serving')}{cache}")

    return KeyboardApp


def run(client: DeviceClient, *, size: tuple[int, int] = (360, 640), interval_s: float = 30.0) -> None:
    configure_kivy(size)
    KeyboardApp = _build_app_class()
    KeyboardApp(client, interval_s=interval_s).run()


def screenshot(
    client: DeviceClient,
    path: str | os.PathLike,
    *,
    text: str = "",
    size: tuple[int, int] = (360, 640),
    status_screen: bool = False,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Render the app with `text` typed, wait for its suggestions, save a PNG, close.

    Returns {"path", "size", "suggestions" (as shown, best first), "slots" (the suggestion buttons left to
    right: text, bold, rank), "text"}."""
    configure_kivy(size)
    KeyboardApp = _build_app_class()
    from kivy.clock import Clock
    from kivy.core.window import Window

    path = Path(path)
    result: dict[str, Any] = {}
    app = KeyboardApp(client, start_worker=False)
    started = time.monotonic()
    frames = {"n": 0}

    def poll(dt: float) -> None:
        ti = app.typing.input
        if ti.text != text:
            ti.text = text
            ti.cursor = ti.get_cursor_from_index(len(text))
            return
        if status_screen and app.sm.current != "status":
            app.sm.current = "status"
            app.refresh_status()
        if not app.suggestions_ready() and time.monotonic() - started < timeout_s:
            return
        frames["n"] += 1
        if frames["n"] < 3:  # let a couple of frames draw the final state
            return
        shot = Window.screenshot(name=str(path.resolve()))  # Kivy inserts a counter: name0001.png
        if shot:
            os.replace(shot, path)
        result.update(path=str(path), size=list(Window.size), suggestions=app.typing.strip.words,
                      slots=app.typing.strip.slots, text=text,
                      ready=app.suggestions_ready())
        Clock.unschedule(poll)
        app.stop()

    Clock.schedule_interval(poll, 0.05)
    app.run()
    return result


__all__ = ["configure_kivy", "run", "screenshot"]
