"""Child processes for the demo and the benchmarks: each in its own process group, its output
streamed to a log file (and, filtered, to the terminal), all of them stopped together.

    sup = Supervisor(run_dir, env)
    child = sup.spawn("server", [sys.executable, "-m", "server", ...], echo=lambda line: line)
    sup.stop_all()   # SIGTERM each group, then SIGKILL, then sweep every remaining descendant
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Sequence

from scripts.console import say
from scripts.errors import DemoError

ROOT = Path(__file__).resolve().parents[1]  # children run in the repository root


def become_subreaper() -> bool:
    """Orphaned grandchildren (e.g. TFF's worker_binary after its parent died) are re-parented to us,
    so the final sweep finds them among our descendants. Linux only; best effort."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


@dataclasses.dataclass
class Child:
    """A started child process, the thread copying its output to its log, and its last lines."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    reader: threading.Thread | None = None
    lines: list[str] = dataclasses.field(default_factory=list)  # the last lines, for error messages

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Supervisor:
    """Starts children in their own process groups, streams their output, stops them all."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = env
        self.children: list[Child] = []

    def spawn(self, name: str, cmd: Sequence[str], *, echo: Callable[[str], str | None] | None = None,
              env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True, bufsize=1,
            errors="replace",
        )
        child = Child(name, proc, log_path)
        child.reader = threading.Thread(target=self._pump, args=(child, echo), name=f"pump-{name}", daemon=True)
        child.reader.start()
        self.children.append(child)
        return child

    @staticmethod
    def _pump(child: Child, echo: Callable[[str], str | None] | None) -> None:
        assert child.proc.stdout is not None
        with open(child.log_path, "a", encoding="utf-8") as log:
            for line in child.proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                child.lines = (child.lines + [line])[-40:]
                shown = echo(line) if echo else None
                if shown:
                    say(shown, prefix=f"[{child.name}] ")

    def stop(self, child: Child, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the child's whole process group, wait, then SIGKILL the group."""
        if child.alive:
            try:
                os.killpg(child.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in the group (the leader may be gone already)
            os.killpg(child.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if child.reader is not None:
            child.reader.join(2)
        return child.proc.returncode

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop(child)
        self.sweep()

    @staticmethod
    def sweep() -> int:
        """Kill every remaining descendant (TFF worker_binary first, politely), then reap them."""
        import psutil

        try:
            from tff_sim.reaper import reap_worker_binaries

            reap_worker_binaries(timeout=3.0)
        except Exception:  # noqa: BLE001 - the sweep below gets them too
            pass
        me = psutil.Process()
        left = me.children(recursive=True)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
        return len(left)


def check_alive(*children: Child | None) -> None:
    """DemoError with the last lines of the first child that exited (None entries are skipped)."""
    for child in children:
        if child is not None and not child.alive:
            tail = "\n".join(child.lines[-15:])
            raise DemoError(f"{child.name} exited with code {child.proc.returncode} (log {child.log_path}):\n{tail}")
