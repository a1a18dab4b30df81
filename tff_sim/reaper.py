"""Reap TFF's C++ worker_binary children, which outlive Python and hold stdout open."""
from __future__ import annotations

import atexit
import signal

import psutil

_installed = False


def worker_binaries(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """TFF worker_binary processes descended from `parent` (default: this process)."""
    parent = parent or psutil.Process()
    found = []
    for child in parent.children(recursive=True):
        try:
            if "worker_binary" in child.name() or any("worker_binary" in part for part in child.cmdline()[:1]):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def reap_worker_binaries(timeout: float = 5.0) -> int:
    """SIGINT each worker_binary (its clean shutdown), SIGKILL what is left; returns the count."""
    procs = worker_binaries()
    for proc in procs:
        try:
            proc.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(procs)


def install_atexit_reaper() -> None:
    """Register the reaper once per process."""
    global _installed
    if not _installed:
        atexit.register(reap_worker_binaries)
        _installed = True
