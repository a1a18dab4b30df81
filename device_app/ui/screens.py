"""The two screens: typing (text, suggestion strip, key grid) and status (federation, privacy,
switches, actions). They only display and forward events; device_app.ui.app holds the logic.

Import only after device_app.ui.app has configured Kivy.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from kivy.metrics import dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.gridlayout import GridLayout
from kivy.uix.label import Label
from kivy.uix.progressbar import ProgressBar
from kivy.uix.screenmanager import Screen
from kivy.uix.scrollview import ScrollView
from kivy.uix.switch import Switch
from kivy.uix.textinput import TextInput
from kivy.graphics import Color, Rectangle

from device_app.personalize import describe_gain, describe_serving
from device_app.reports import describe_privacy
from device_app.ui.keyboard import KeyGrid, SuggestionStrip

BG = (0.09, 0.10, 0.12, 1)
TEXT_BG = (0.97, 0.97, 0.98, 1)


def describe_backends(backends: dict[str, Any] | None) -> str:
    """ "suggest tflite, train keras": which interpreter each job runs on (ModelState.backends())."""
    if not backends or not backends.get("suggestions"):
        return "-"
    return f"suggest {backends['suggestions']}, train {backends.get('training') or '-'}"


def _paint(widget: Any, rgba: tuple[float, float, float, float]) -> None:
    with widget.canvas.before:
        Color(*rgba)
        rect = Rectangle(pos=widget.pos, size=widget.size)
    widget.bind(pos=lambda w, p: setattr(rect, "pos", p), size=lambda w, s: setattr(rect, "size", s))


def _label(text: str = "", **kw: Any) -> Label:
    kw.setdefault("font_size", sp(14))
    kw.setdefault("halign", "left")
    kw.setdefault("valign", "middle")
    label = Label(text=text, **kw)
    label.bind(size=lambda w, s: setattr(w, "text_size", (s[0], None)))
    return label


class TypingScreen(Screen):
    def __init__(self, *, on_status: Callable[[], None], **kw: Any) -> None:
        super().__init__(name="typing", **kw)
        root = BoxLayout(orientation="vertical", spacing=dp(2))
        _paint(root, BG)

        bar = BoxLayout(orientation="horizontal", size_hint_y=None, height=dp(44), padding=(dp(8), dp(4)), spacing=dp(6))
        self.title = _label("Keyboard", font_size=sp(17), bold=True)
        self.badge = _label("", font_size=sp(12), color=(0.75, 0.8, 0.9, 1), halign="right")
        status_button = Button(text="Status", size_hint_x=None, width=dp(76), font_size=sp(14))
        status_button.bind(on_release=lambda *_: on_status())
        bar.add_widget(self.title)
        bar.add_widget(self.badge)
        bar.add_widget(status_button)
        root.add_widget(bar)

        self.history = _label("", font_size=sp(14), valign="bottom", color=(0.85, 0.87, 0.9, 1), padding=(dp(10), dp(6)))
        root.add_widget(self.history)

        self.input = TextInput(
            multiline=False, size_hint_y=None, height=dp(52), font_size=sp(19), hint_text="Type a message",
            background_color=TEXT_BG, padding=(dp(10), dp(14)), text_validate_unfocus=False, write_tab=False,
        )
        self.input.unfocus_on_touch = False  # tapping keys or suggestions keeps the physical keyboard working
        root.add_widget(self.input)

        self.progress = ProgressBar(max=1.0, value=0.0, size_hint_y=None, height=dp(4), opacity=0)
        root.add_widget(self.progress)

        self.strip = SuggestionStrip(size_hint_y=None, height=dp(48))
        root.add_widget(self.strip)

        self.keys = KeyGrid(size_hint_y=None, height=dp(236))
        _paint(self.keys, (0.12, 0.13, 0.15, 1))
        root.add_widget(self.keys)
        self.add_widget(root)

    def show_history(self, messages: list[str]) -> None:
        self.history.text = "\n".join(messages[-6:])


class StatusScreen(Screen):
    """Server, model, personalization, federation and privacy state; switches; actions."""

    FIELDS = (
        ("connection", "Connection"),
        ("global_version", "Global model"),
        ("serving", "Suggestions from"),
        ("backends", "Runs on"),
        ("gain", "Top-1 on held-back text"),
        ("last_round", "Last round joined"),
        ("contributions", "Contributions"),
        ("epsilon", "Population epsilon"),
        ("guarantee", "Privacy guarantee"),
        ("messages", "Messages on device"),
        ("pending", "Waiting uploads"),
        ("outcome", "Last check-in"),
    )
    LINES = {"gain": 3, "guarantee": 8}  # gain: global / +cache / +fine-tuning / served; guarantee: one sentence
    SWITCHES = (
        ("participate", "Take part in training"),
        ("charging", "Charging"),
        ("unmetered", "Unmetered network"),
        ("idle", "Idle"),
        ("use_personal", "Use personal model"),
    )

    def __init__(
        self,
        *,
        on_back: Callable[[], None],
        on_action: Callable[[str], None],
        on_switch: Callable[[str, bool], None],
        on_server: Callable[[str], None],
        **kw: Any,
    ) -> None:
        super().__init__(name="status", **kw)
        root = BoxLayout(orientation="vertical")
        _paint(root, BG)

        bar = BoxLayout(orientation="horizontal", size_hint_y=None, height=dp(44), padding=(dp(8), dp(4)), spacing=dp(6))
        back = Button(text="Back", size_hint_x=None, width=dp(70), font_size=sp(14))
        back.bind(on_release=lambda *_: on_back())
        bar.add_widget(back)
        bar.add_widget(_label("Status", font_size=sp(17), bold=True))
        root.add_widget(bar)

        scroll = ScrollView(do_scroll_x=False)
        grid = GridLayout(cols=1, size_hint_y=None, spacing=dp(4), padding=(dp(10), dp(6)))
        grid.bind(minimum_height=grid.setter("height"))

        server_row = BoxLayout(size_hint_y=None, height=dp(40), spacing=dp(6))
        self.server = TextInput(multiline=False, font_size=sp(14), hint_text="server URL (empty: offline)",
                                padding=(dp(6), dp(10)))
        connect = Button(text="Set", size_hint_x=None, width=dp(56))
        connect.bind(on_release=lambda *_: on_server(self.server.text))
        self.server.bind(on_text_validate=lambda *_: on_server(self.server.text))
        server_row.add_widget(self.server)
        server_row.add_widget(connect)
        grid.add_widget(server_row)

        self.values: dict[str, Label] = {}
        for key, title in self.FIELDS:
            row = BoxLayout(size_hint_y=None, height=dp(30) * self.LINES.get(key, 1))
            row.add_widget(_label(title, color=(0.7, 0.74, 0.8, 1), size_hint_x=0.48))
            value = _label("-", size_hint_x=0.52)
            self.values[key] = value
            row.add_widget(value)
            grid.add_widget(row)

        self.switches: dict[str, Switch] = {}
        self._updating = False
        for key, title in self.SWITCHES:
            row = BoxLayout(size_hint_y=None, height=dp(36))
            row.add_widget(_label(title, size_hint_x=0.62))
            switch = Switch(active=True, size_hint_x=0.38)
            switch.bind(active=lambda _s, v, k=key: None if self._updating else on_switch(k, bool(v)))
            self.switches[key] = switch
            row.add_widget(switch)
            grid.add_widget(row)

        self.progress_label = _label("", font_size=sp(12), size_hint_y=None, height=dp(22), color=(0.75, 0.8, 0.9, 1))
        self.progress = ProgressBar(max=1.0, value=0.0, size_hint_y=None, height=dp(8))
        grid.add_widget(self.progress_label)
        grid.add_widget(self.progress)

        actions = GridLayout(cols=3, size_hint_y=None, height=dp(48), spacing=dp(6))
        for job, title in (("train_now", "Train now"), ("sync", "Sync now"), ("forget", "Forget my data")):
            button = Button(text=title, font_size=sp(14),
                            background_color=(0.8, 0.2, 0.2, 1) if job == "forget" else (1, 1, 1, 1))
            button.bind(on_release=lambda _b, j=job: on_action(j))
            actions.add_widget(button)
        grid.add_widget(actions)
        self.note = _label("", font_size=sp(12), size_hint_y=None, height=dp(40), color=(0.9, 0.8, 0.5, 1))
        grid.add_widget(self.note)

        scroll.add_widget(grid)
        root.add_widget(scroll)
        self.add_widget(root)

    def update(self, status: dict[str, Any], busy: str | None) -> None:
        v = self.values
        if not self.server.focus:
            self.server.text = status.get("server_url") or ""
        conn = status.get("connection", "-")
        v["connection"].text = conn if not status.get("device_id") else f"{conn} ({status['device_id']})"
        model = status.get("model") or {}
        gv = status.get("global_version")
        v["global_version"].text = "none yet" if gv is None else f"v{gv} ({model.get('preset')}, {model.get('vocab_size')} words)"
        v["serving"].text = describe_serving(model)
        v["backends"].text = describe_backends(model.get("backends"))
        v["gain"].text = "\n".join(describe_gain(status.get("personal_gain")))
        last = status.get("last_round")
        v["last_round"].text = "none" if not last else f"round {last['round_id']} (base v{last['base_version']})"
        v["contributions"].text = f"{status.get('contributions', 0)} updates, {status.get('evaluations', 0)} evaluations"
        privacy = dict(status.get("privacy") or {})
        if status.get("population_epsilon") is not None:
            privacy.setdefault("epsilon", status["population_epsilon"])
        # epsilon at its delta, the accountant, the mechanism, and the server's one-sentence guarantee
        v["epsilon"].text, v["guarantee"].text = describe_privacy(privacy)
        v["messages"].text = str(status.get("messages", 0))
        v["pending"].text = str(len(status.get("pending_uploads") or []))
        outcome = status.get("last_outcome")
        v["outcome"].text = "-" if not outcome else f"{outcome['status']} {time.strftime('%H:%M:%S', time.localtime(outcome['at']))}"
        settings = status.get("settings") or {}
        self._updating = True
        try:
            for key, switch in self.switches.items():
                value = status.get("use_personal") if key == "use_personal" else settings.get(key)
                if value is not None and switch.active != bool(value):
                    switch.active = bool(value)
        finally:
            self._updating = False
        progress = status.get("progress")
        if progress:
            self.progress.value, self.progress_label.text = progress[0], progress[1]
        else:
            self.progress.value = 0.0
            self.progress_label.text = f"working: {busy}" if busy else ""
