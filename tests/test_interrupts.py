"""models.interrupts: a Ctrl-C that lands in a finalizer is not lost; later signals do not cut the cleanup short.

Each case runs in its own interpreter: signal handlers and sys.unraisablehook are process-wide.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A signal that arrives while a finalizer runs: Python runs the handler inside __del__, whose
# exception is "ignored". The main loop then waits for the stop (an event, with a generous bound).
SWALLOWED = """
import _thread, signal, sys, time
from models import interrupts
if {install}:
    interrupts.install()

class Finalized:
    def __del__(self):
        _thread.interrupt_main({sig})  # the signal arrives while the finalizer runs
        for _ in range(10_000):        # the handler runs at one of these bytecodes, inside __del__
            pass

try:
    Finalized()  # refcount zero: __del__ runs at once
    print("finalizer done", flush=True)
    deadline = time.monotonic() + 5  # re-delivery takes ~50 ms; the control case waits it out
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("LOST")
    sys.exit(3)
except KeyboardInterrupt as exc:
    print("STOPPED", interrupts.acknowledge(exc) if {install} else 130)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_ctrl_c_swallowed_by_a_finalizer_is_delivered_again():
    done = _run(SWALLOWED.format(install=True, sig=2))
    assert "finalizer done" in done.stdout and "STOPPED 130" in done.stdout, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


def test_sigterm_is_delivered_again_too_and_exits_143():
    done = _run(SWALLOWED.format(install=True, sig=15))
    assert "STOPPED 143" in done.stdout, done.stdout + done.stderr


def test_without_install_python_loses_that_ctrl_c():
    """The failure the module exists for (if Python ever stops losing it, this test says so)."""
    done = _run(SWALLOWED.format(install=False, sig=2))
    assert "LOST" in done.stdout and done.returncode == 3, done.stdout + done.stderr


def test_after_acknowledge_a_second_signal_does_not_interrupt_the_cleanup():
    done = _run("""
        import os, signal, time
        from models import interrupts
        interrupts.install()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
            print("LOST")
        except KeyboardInterrupt as exc:
            code = interrupts.acknowledge(exc)
            os.kill(os.getpid(), signal.SIGINT)  # pressed again while the checkpoint is written
            for _ in range(100_000):
                pass
            print("cleanup finished", code)
        """)
    assert "cleanup finished 130" in done.stdout, done.stdout + done.stderr
    assert "already stopping" in done.stderr


def test_check_raises_a_pending_request_that_some_code_swallowed():
    done = _run("""
        import os, signal
        from models import interrupts
        interrupts.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
        except BaseException:
            pass  # a library that swallows everything
        print("requested", interrupts.requested())
        try:
            interrupts.check()
            print("LOST")
        except interrupts.Interrupted as exc:
            print("raised", exc.exit_code)
        """)
    assert "requested True" in done.stdout and "raised 143" in done.stdout, done.stdout + done.stderr


def test_an_error_that_c_code_made_of_the_stop_counts_as_the_stop():
    done = _run("""
        import os, signal
        from models import interrupts
        interrupts.install()
        print("before", interrupts.caused_by_stop(ValueError("a real failure")))
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))
            except BaseException:  # what TensorFlow's C++ nest utilities did with it
                raise AttributeError("'bool' object has no attribute 'keys'")
        except BaseException as exc:
            print("after", interrupts.caused_by_stop(exc), interrupts.acknowledge(exc))
        """)
    assert "before False" in done.stdout and "after True 143" in done.stdout, done.stdout + done.stderr


def test_stop_code_reraises_what_is_not_the_stop():
    done = _run("""
        from models import interrupts
        interrupts.install()
        try:
            try:
                raise ValueError("a real failure")
            except BaseException as exc:
                interrupts.stop_code(exc)
        except ValueError as exc:
            print("re-raised", exc)
        """)
    assert "re-raised a real failure" in done.stdout, done.stdout + done.stderr
