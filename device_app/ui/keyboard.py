"""Widgets: the on-screen key grid and the suggestion strip.

Import only after device_app.ui.app has configured Kivy (window size, headless video driver).
"""
from __future__ import annotations

from typing import Sequence

from kivy.metrics import dp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button

LETTERS: list[list[str]] = [
    list("qwertyuiop"),
    list("asdfghjkl"),
    ["shift", *"zxcvbnm", "del"],
    ["123", ",", "space", ".", "send"],
]
SYMBOLS: list[list[str]] = [
    list("1234567890"),
    list("@#$%&-+()/"),
    ["shift", *"*\"':;!?", "del"],
    ["abc", ",", "space", ".", "send"],
]
# Relative widths of the wide keys.
WIDTHS = {"space": 4.0, "shift": 1.5, "del": 1.5, "send": 1.6, "123": 1.4, "abc": 1.4}
KEY_BG = (0.22, 0.24, 0.28, 1)
SPECIAL_BG = (0.15, 0.16, 0.19, 1)
SEND_BG = (0.10, 0.45, 0.85, 1)


class KeyGrid(BoxLayout):
    """Rows of keys. Dispatches on_key(key): a character, or shift/del/space/send/123/abc."""

    __events__ = ("on_key",)

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("orientation", "vertical")
        kwargs.setdefault("spacing", dp(4))
        kwargs.setdefault("padding", (dp(3), dp(4)))
        super().__init__(**kwargs)
        self.shift = False
        self.layer = "letters"
        self.keys: dict[str, Button] = {}
        self._build()

    def _build(self) -> None:
        self.clear_widgets()
        self.keys = {}
        rows = LETTERS if self.layer == "letters" else SYMBOLS
        for row in rows:
            line = BoxLayout(orientation="horizontal", spacing=dp(4))
            for key in row:
                special = len(key) > 1
                label = key.upper() if (self.shift and not special) else key
                if key == "shift" and self.shift:
                    label = "SHIFT"
                button = Button(
                    text=label,
                    font_size=dp(15) if special else dp(19),
                    size_hint_x=WIDTHS.get(key, 1.0),
                    background_normal="",
                    background_color=SEND_BG if key == "send" else (SPECIAL_BG if special else KEY_BG),
                )
                button.bind(on_release=lambda _b, k=key: self._press(k))
                self.keys[key] = button
                line.add_widget(button)
            self.add_widget(line)

    def _press(self, key: str) -> None:
        if key == "shift":
            self.shift = not self.shift
            self._build()
            return
        if key in ("123", "abc"):
            self.layer = "symbols" if key == "123" else "letters"
            self._build()
            return
        if len(key) == 1 and self.shift:
            key = key.upper()
            self.shift = False
            self._build()
        self.dispatch("on_key", key)

    def on_key(self, key: str) -> None:  # default handler (Kivy needs one per event)
        pass


class SuggestionStrip(BoxLayout):
    """Three suggestion buttons; buttons[i] holds suggestion #i+1. Dispatches on_pick(word).

    Gboard's layout: the best suggestion sits in the middle slot, in bold; #2 left, #3 right."""

    __events__ = ("on_pick",)

    def __init__(self, n: int = 3, **kwargs) -> None:
        kwargs.setdefault("orientation", "horizontal")
        kwargs.setdefault("spacing", dp(2))
        super().__init__(**kwargs)
        self.buttons: list[Button] = []
        for i in range(n):
            button = Button(
                text="", font_size=dp(17), bold=(i == 0), background_normal="",  # the top suggestion
                background_color=(0.30, 0.32, 0.37, 1), color=(1, 1, 1, 1),
                shorten=True, shorten_from="right",
            )
            button.bind(size=lambda b, s: setattr(b, "text_size", (s[0] - dp(6), None)))
            button.halign = "center"
            button.bind(on_release=lambda b: b.text and self.dispatch("on_pick", b.text))
            self.buttons.append(button)
        # Gboard puts the best guess in the middle: order [2nd, 1st, 3rd].
        for idx in (1, 0, 2)[:n] if n == 3 else range(n):
            self.add_widget(self.buttons[idx])

    def show(self, words: Sequence[str]) -> None:
        words = list(words)[: len(self.buttons)]
        for i, button in enumerate(self.buttons):
            button.text = words[i] if i < len(words) else ""

    @property
    def slots(self) -> list[dict[str, object]]:
        """The buttons left to right as shown: {"text", "bold", "rank"} (rank 1 = the top suggestion)."""
        return [{"text": b.text, "bold": bool(b.bold), "rank": self.buttons.index(b) + 1}
                for b in reversed(self.children)]  # Kivy keeps children last-added first

    @property
    def words(self) -> list[str]:
        """Suggestions in rank order (best first), as displayed (empty buttons left out)."""
        return [b.text for b in self.buttons if b.text]

    def on_pick(self, word: str) -> None:
        pass
