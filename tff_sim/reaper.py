"""Reap TFF's C++ worker_binary children, which outlive Python and hold stdout open."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from typing import NoReturn

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


def stop_tff_execution(timeout: float = 2.0) -> None:
    """Stop TFF's execution thread from taking further steps, so that it cannot start a new worker_binary
    (TFF restarts a worker it finds dead) while the workers are reaped.

    Reaches into TFF 0.87's SyncExecutionContext (its AsyncThreadRunner's event loop and thread; the
    version is pinned). Waits up to `timeout` for the thread; one stuck in C++ is left to the exit."""
    tff = sys.modules.get("tensorflow_federated")
    if tff is None:
        return
    try:
        runner = getattr(tff.framework.get_context_stack().current, "_async_runner", None)
    except AttributeError:  # interrupted while TFF itself was being imported: no context yet
        return
    loop, thread = getattr(runner, "_event_loop", None), getattr(runner, "_thread", None)
    if loop is None or thread is None or loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)


def exit_after_interrupt(code: int) -> NoReturn:
    """End an interrupted TFF run now: stop TFF's thread, reap its workers, flush, os._exit(code).

    Not a normal interpreter exit: TFF's daemon thread may be inside C++ (a gRPC call to the worker,
    a computation being started), and finalization would unwind it with pthread_exit, which a C++
    catch-all turns into "terminate called ... FATAL: exception not rethrown" and SIGABRT instead
    of the documented exit code. Everything the run promises (checkpoint, report) is written by then."""
    stop_tff_execution()
    reap_worker_binaries()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
