"""Ctrl-C and SIGTERM that are never lost, for every long-running command.

Why a module of its own: Python runs a signal handler between two bytecodes of the main thread,
wherever that thread is. When it is inside a garbage-collector callback (jax, which TFF imports,
registers `_xla_gc_callback`), a `__del__` or a weakref callback (TensorFlow has many), the
KeyboardInterrupt the handler raises is "ignored" (handed to `sys.unraisablehook`) and the program
runs on as if the key had never been pressed. That is how `python -m tff_sim` finished all its
rounds after a Ctrl-C during start-up or tracing.

`install()` fixes the cause: the handler records the request and raises `Interrupted`; the
unraisable hook, seeing that exception swallowed by a finalizer, has it delivered to the main
thread again from a helper thread a moment later, when it lands outside the finalizer. `check()` raises a pending request at
safe points, for code that swallows exceptions some other way. The first `except` that handles
the stop (`caused_by_stop(exc)`: the Interrupted itself, or an error C code made of it) calls
`acknowledge()`: later signals then only say that a stop is under way, so the
cleanup (checkpoint, report, reaping children) is not cut short.

Exit codes: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports them.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVERY_DELAY_S = 0.05  # finalizers and gc callbacks run for microseconds to milliseconds


class Interrupted(KeyboardInterrupt):
    """A stop asked for by SIGINT or SIGTERM; a KeyboardInterrupt, so `except Exception` lets it pass."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.signum: int | None = None  # the first stop request
        self.acknowledged = False
        self.requested = threading.Event()  # for worker threads: stop between steps
        self.on_request: list[Callable[[int], None]] = []
        self.previous_hook: Callable[[Any], None] | None = None


_state = _State()


def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    if _state.signum is None:
        _state.signum = signum
        _state.requested.set()
        for fn in list(_state.on_request):
            fn(signum)
    if _state.acknowledged:
        # os.write, not print: the cleanup may be inside a write to stderr, and print would be re-entrant
        os.write(2, f"\n{signal.Signals(signum).name}: already stopping, finishing the cleanup\n".encode())
        return
    raise Interrupted(_state.signum)


def _redeliver_soon(signum: int) -> None:
    """Raise the stop in the main thread again, once it has left the finalizer that swallowed it.

    From another thread, a moment later: called synchronously, the handler would run inside this hook
    (or the finalizer) again, and be swallowed again."""
    def deliver() -> None:
        time.sleep(REDELIVERY_DELAY_S)
        if not _state.acknowledged:
            _thread.interrupt_main(signum)

    threading.Thread(target=deliver, name="interrupt-redelivery", daemon=True).start()


def _unraisable_hook(unraisable: Any) -> None:
    try:
        if isinstance(unraisable.exc_value, Interrupted):
            if not _state.acknowledged:
                _redeliver_soon(unraisable.exc_value.signum)
            return
        (_state.previous_hook or sys.__unraisablehook__)(unraisable)
    except Interrupted as exc:  # the re-delivery landed in this hook: once more, from outside it
        _redeliver_soon(exc.signum)


def install(on_request: Callable[[int], None] | None = None) -> bool:
    """Route SIGINT and SIGTERM through `Interrupted` in the main thread (idempotent).

    on_request(signum) runs once, in the main thread, when the first stop arrives (e.g. to tell
    worker threads to stop). Returns False when called off the main thread (nothing installed).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if on_request is not None:
        _state.on_request.append(on_request)
    if not _state.installed:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        _state.previous_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable_hook
        _state.installed = True
    return True


def requested() -> bool:
    """A stop was asked for (whether or not it has been handled yet)."""
    return _state.requested.is_set()


def stop_event() -> threading.Event:
    """Set once a stop is asked for: worker threads wait on it or poll it between steps."""
    return _state.requested


def caused_by_stop(exc: BaseException) -> bool:
    """This exception is the stop, or came out of it: C code that calls back into Python (TensorFlow's
    nest utilities, say) can turn the Interrupted raised in the callback into an unrelated error
    ("'bool' object has no attribute 'keys'"). Once a stop was asked for, what ends the program is it."""
    return isinstance(exc, KeyboardInterrupt) or (requested() and not isinstance(exc, SystemExit))


def stop_code(exc: BaseException) -> int:
    """For the `except BaseException` at a command's top: the exit code of the stop that `exc` is (after
    acknowledging it, so the cleanup that follows cannot be cut short); any other exception is re-raised."""
    if not caused_by_stop(exc):
        raise exc
    return acknowledge(exc)


def check() -> None:
    """Raise the pending stop request, if any: for safe points between long steps."""
    if _state.signum is not None and not _state.acknowledged:
        raise Interrupted(_state.signum)


def acknowledge(exc: BaseException | None = None) -> int:
    """The program is stopping (a signal's stop is being handled, or the cleanup began): later signals
    no longer raise, they only say so. Returns the exit code of the stop (128 + signal)."""
    _state.acknowledged = True
    signum = exc.signum if isinstance(exc, Interrupted) else _state.signum
    return 128 + (signum if signum is not None else signal.SIGINT)


__all__ = ["Interrupted", "acknowledge", "caused_by_stop", "check", "install", "requested", "stop_code", "stop_event"]
