"""Run a simulation's clients on TFF worker processes (`python -m tff_sim.worker`) over gRPC.

    python -m tff_sim ... --workers 10.0.0.5:8000,10.0.0.6:8000

Each worker is TFF's C++ `worker_binary` (the same executor service TFF starts locally, here on another
machine). With one worker the whole computation runs there, as it would locally. With several, TFF's
mergeable-computation context splits each round's clients into one contiguous slice per worker, runs
each slice up to the aggregation on its worker, merges the partial aggregates (the aggregator's own
`merge`) and runs the server step once; the result equals the local run up to float summation order.

Everything TFF- or gRPC-specific is imported lazily: `parse_workers` stays cheap for the config and the
command line. Byte counts are the serialized sizes of every gRPC request and response (protobuf
`ByteSize()`, the exact payload on the wire less gRPC/HTTP2 framing), counted by a channel interceptor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Iterator, Sequence

log = logging.getLogger("tff_sim")

START_TIMEOUT_S = 15.0  # how long `installed` waits for every worker to accept a gRPC connection
LOST_GRACE_S = 5.0  # how long a worker that dropped its connection may take to come back within a round
# TFF's own limits for its local worker (executor_factory._GRPC_CHANNEL_OPTIONS): a gboard state is MBs,
# a big cohort's datasets can be far more. Reconnect backoff kept short so a restarted worker is found fast.
GRPC_OPTIONS = [
    ("grpc.max_message_length", 2 * 1000 * 1000 * 1000),
    ("grpc.max_receive_message_length", 2 * 1000 * 1000 * 1000),
    ("grpc.max_send_message_length", 2 * 1000 * 1000 * 1000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WorkerError(RuntimeError):
    """A worker problem the user must fix (the message says which worker and what to do)."""


class WorkerUnavailable(WorkerError):
    """A worker could not be reached when the run started."""


class WorkerLost(WorkerError):
    """A worker stopped answering during a computation: the round fails, the checkpoint stays."""

    def __init__(self, address: str, detail: str, what: str = "stopped answering during a round") -> None:
        host, _, port = address.rpartition(":")
        super().__init__(
            f"TFF worker {address} {what} ({detail}). The round failed and was not "
            f"applied; the run folder keeps the checkpoint of the last finished round. Restart the worker "
            f"(on {host}: python -m tff_sim.worker --port {port}) or leave it out of --workers, then rerun the "
            f"same command to resume from that checkpoint.")
        self.address = address


class WorkersUnsupported(WorkerError):
    """The process cannot be split across workers (TFF cannot compile it to mergeable form)."""


# ---------------------------------------------------------------------------------------------- addresses


def parse_workers(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """"HOST:PORT[,HOST:PORT...]" (or a list of them) as normalized "host:port" strings; ValueError if malformed.

    IPv6 hosts go in brackets ([::1]:8000). The same worker twice is refused: it would only run two
    slices of the cohort one after the other on one machine."""
    if spec is None:
        return ()
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("--workers needs at least one HOST:PORT")
    out: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--workers: {part!r} is not HOST:PORT (e.g. 10.0.0.5:8000, [::1]:8000)")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"--workers: put an IPv6 address in brackets: [{host}]:{port}")
        address = f"{host.lower()}:{int(port)}"
        if address in out:
            raise ValueError(f"--workers: {address} is listed twice")
        out.append(address)
    return tuple(out)


# ------------------------------------------------------------------------------------------- byte counts


@dataclasses.dataclass
class Traffic:
    """What crossed one worker's channel: serialized request/response bytes, calls and time in calls, and
    the bytes by kind ("CreateValue:computation" = TFF computations, "CreateValue:federated" = values
    such as the server state and the clients' datasets, "Compute" = results coming back, ...)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    call_seconds: float = 0.0
    by_kind: dict[str, int] = dataclasses.field(default_factory=dict)

    def copy(self) -> "Traffic":
        return dataclasses.replace(self, by_kind=dict(self.by_kind))

    def __sub__(self, other: "Traffic") -> "Traffic":
        kinds = {k: v - other.by_kind.get(k, 0) for k, v in self.by_kind.items()}
        return Traffic(self.bytes_sent - other.bytes_sent, self.bytes_received - other.bytes_received,
                       self.calls - other.calls, self.call_seconds - other.call_seconds,
                       {k: v for k, v in kinds.items() if v})


def _kind(method: str | bytes, request: Any) -> str:
    name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
    if name == "CreateValue":
        return f"{name}:{request.value.WhichOneof('value')}"
    return name


def _counting_interceptor(traffic: Traffic, lock: threading.Lock):
    import grpc

    class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
        """Counts each request's and response's serialized size (TFF's executor service is all unary)."""

        def intercept_unary_unary(self, continuation, client_call_details, request):
            started = time.perf_counter()
            call = continuation(client_call_details, request)
            try:
                received = call.result().ByteSize()
            except grpc.RpcError:
                received = 0  # the call object re-raises for the caller; nothing came back
            sent, kind = request.ByteSize(), _kind(client_call_details.method, request)
            with lock:
                traffic.bytes_sent += sent
                traffic.bytes_received += received
                traffic.calls += 1
                traffic.call_seconds += time.perf_counter() - started
                traffic.by_kind[kind] = traffic.by_kind.get(kind, 0) + sent
                if received:
                    traffic.by_kind[f"{kind} (reply)"] = traffic.by_kind.get(f"{kind} (reply)", 0) + received
            return call

    return CountingInterceptor()


# ----------------------------------------------------------------------------------------------- workers


class Worker:
    """One worker: its gRPC channel (counted), the TFF stub over it and an executor factory for TFF."""

    def __init__(self, address: str) -> None:
        import grpc
        from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
        from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub

        self.address = address
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._raw = grpc.insecure_channel(address, GRPC_OPTIONS)
        channel = grpc.intercept_channel(self._raw, _counting_interceptor(self.traffic, self._lock))
        self.stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
        self.executor_factory = python_executor_stacks.ResourceManagingExecutorFactory(
            executor_stack_fn=self._executor_stack)

    def snapshot(self) -> Traffic:
        with self._lock:
            return self.traffic.copy()

    @property
    def raw_channel(self) -> Any:
        return self._raw

    def wait_ready(self, timeout: float) -> bool:
        return not _unreachable({self.address: self._raw}, timeout)

    def _executor_stack(self, cardinalities: dict) -> Any:
        """TFF calls this for each new executor, and again on each retry after a failed call. TFF retries
        UNAVAILABLE forever (every 30 s), so a worker that is gone must end the retries here."""
        from tensorflow_federated.python.core.impl.executors import remote_executor
        from tensorflow_federated.python.core.impl.types import placements

        if not self.stub.is_ready and not self.wait_ready(LOST_GRACE_S):
            raise WorkerLost(self.address, f"no gRPC connection for {LOST_GRACE_S:.0f} s")
        if cardinalities.get(placements.CLIENTS) is None:
            cardinalities[placements.CLIENTS] = 0  # as TFF's local factory: a no-client computation
        executor = remote_executor.RemoteExecutor(self.stub)
        executor.set_cardinalities(cardinalities)
        return executor

    def close(self) -> None:
        self._raw.close()  # also ends a call still blocked on this worker


def _worker_context(worker: Worker):
    """An async TFF context for one worker, running on its own event-loop thread.

    TFF's RemoteExecutor makes blocking gRPC calls inside coroutines: on one shared event loop a worker's
    Compute call would stall every other worker's calls, so each worker gets its own loop. Errors from
    the worker come out as WorkerLost, naming it."""
    import grpc
    from tensorflow_federated.python.common_libs import async_utils
    from tensorflow_federated.python.core.backends.native import compiler
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.context_stack import context_base
    from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
    from tensorflow_federated.python.core.impl.executors import executors_errors

    class WorkerContext(context_base.AsyncContext):
        def __init__(self) -> None:
            self.worker = worker
            self._inner = async_execution_context.AsyncExecutionContext(
                executor_fn=worker.executor_factory, compiler_fn=compiler.desugar_and_transform_to_native,
                transform_args=tensorflow_computation.transform_args,
                transform_result=tensorflow_computation.transform_result)
            self._runner = async_utils.AsyncThreadRunner()

        async def invoke(self, comp, arg):
            try:
                return await self._runner.await_coro_and_return_result(self._inner.invoke(comp, arg))
            except executors_errors.RetryableError as exc:
                raise WorkerLost(worker.address, type(exc).__name__) from exc
            except grpc.RpcError as exc:  # not a lost connection (TFF retries those): the worker failed the call
                code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.Call) else (None, str(exc))
                raise WorkerLost(worker.address, f"gRPC {getattr(code, 'name', '?')}: {str(details)[:300]}",
                                 what="failed a computation") from exc

        def stop(self) -> None:
            _stop_runner(self._runner)

    return WorkerContext()


def _stop_runner(runner: Any, timeout: float = 2.0) -> None:
    """Stop a TFF AsyncThreadRunner's loop and join its thread now. Its own __del__ would do the same
    whenever it is collected, and raises when that happens on its own thread (a task holding the last
    reference), so it is disarmed. TFF 0.87 (pinned) exposes no public handle for either."""
    loop, thread = getattr(runner, "_event_loop", None), getattr(runner, "_thread", None)
    if loop is None or thread is None:
        return
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout)
    runner._finalizer = lambda loop, thread: None  # noqa: SLF001


def _mergeable_compiler(comp):
    from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler

    try:
        return mergeable_comp_compiler.compile_to_mergeable_comp_form(comp)
    except (ValueError, TypeError) as exc:
        raise WorkersUnsupported(
            f"this configuration's TFF computation cannot be split across workers (TFF's mergeable form: {exc}); "
            "run it with one worker (--workers HOST:PORT) or locally") from exc


def _sync_context(contexts: list):
    """One worker: the computation runs there whole (no split, no merge: exactly the local path)."""
    from tensorflow_federated.python.common_libs import async_utils
    from tensorflow_federated.python.core.impl.context_stack import context_base

    class SyncWorkerContext(context_base.SyncContext):
        def __init__(self) -> None:
            # the attribute name TFF's own contexts use: reaper.stop_tff_execution stops this loop
            self._async_runner = async_utils.AsyncThreadRunner()

        def invoke(self, comp, arg):
            return self._async_runner.run_coro_and_return_result(contexts[0].invoke(comp, arg))

    return SyncWorkerContext()


class WorkerPool:
    """The workers of a run and the TFF execution context over them."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = tuple(addresses)
        self.workers = [Worker(a) for a in self.addresses]
        self._contexts = [_worker_context(w) for w in self.workers]
        if len(self._contexts) == 1:
            self.context = _sync_context(self._contexts)
        else:
            from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
            from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context

            self.context = mergeable_comp_execution_context.MergeableCompExecutionContext(
                self._contexts, compiler_fn=_mergeable_compiler,
                transform_args=tensorflow_computation.transform_args,
                transform_result=tensorflow_computation.transform_result)

    def check_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """WorkerUnavailable, naming every worker that accepts no gRPC connection within `timeout`."""
        down = _unreachable({w.address: w.raw_channel for w in self.workers}, timeout)
        if down:
            raise WorkerUnavailable(_unreachable_message(down, timeout))

    def snapshot(self) -> list[Traffic]:
        return [w.snapshot() for w in self.workers]

    def since(self, mark: list[Traffic]) -> dict[str, Any]:
        """Metrics-row fields: worker count and the bytes each way since `mark` (all workers together)."""
        delta = [now - then for now, then in zip(self.snapshot(), mark)]
        return {"workers": len(self.workers),
                "bytes_to_workers": sum(d.bytes_sent for d in delta),
                "bytes_from_workers": sum(d.bytes_received for d in delta),
                "worker_rpcs": sum(d.calls for d in delta)}

    def close(self) -> None:
        for w in self.workers:  # first: a call still blocked on a worker returns, so its loop can stop
            w.close()
        _stop_runner(getattr(self.context, "_async_runner", None))
        for ctx in self._contexts:
            ctx.stop()


_active: WorkerPool | None = None


def current() -> WorkerPool | None:
    """The pool installed by `installed`, if any."""
    return _active


@contextlib.contextmanager
def installed(spec: str | Sequence[str], timeout: float = START_TIMEOUT_S) -> Iterator[WorkerPool]:
    """Make the workers TFF's default execution context for the block (checked reachable first), then
    put the previous default back (so a test or notebook can run locally again afterwards)."""
    global _active
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    if _active is not None:
        raise RuntimeError("workers are already installed")
    pool = WorkerPool(parse_workers(spec))
    try:
        pool.check_ready(timeout)
        stack = context_stack_impl.context_stack
        previous = stack._stack[0]  # noqa: SLF001 - TFF 0.87 (pinned) has a setter but no getter for the default
        stack.set_default_context(pool.context)
        _active = pool
        log.info("running the clients on %d TFF worker%s: %s", len(pool.addresses),
                 "s" if len(pool.addresses) > 1 else "", ", ".join(pool.addresses))
        try:
            yield pool
        finally:
            _active = None
            stack.set_default_context(previous)
    finally:
        pool.close()


def mark() -> list[Traffic] | None:
    """A traffic mark on the installed pool (None without workers), for `since`."""
    return _active.snapshot() if _active is not None else None


def since(mark_: list[Traffic] | None) -> dict[str, Any]:
    """The installed pool's traffic since `mark_` as metrics-row fields ({} without workers)."""
    return _active.since(mark_) if _active is not None and mark_ is not None else {}


def reachability_problem(spec: str, timeout: float = START_TIMEOUT_S) -> str | None:
    """None when every worker accepts a gRPC connection, else the message (needs grpc only, not TF: so a
    command line can refuse a bad --workers in a second, before TensorFlow loads)."""
    import grpc

    channels = {a: grpc.insecure_channel(a, GRPC_OPTIONS) for a in parse_workers(spec)}
    try:
        down = _unreachable(channels, timeout)
    finally:
        for channel in channels.values():
            channel.close()
    return _unreachable_message(down, timeout) if down else None


def _unreachable(channels: dict[str, Any], timeout: float) -> list[str]:
    """The addresses whose channel is not READY within `timeout` (all waited for at once)."""
    import grpc

    futures = {a: grpc.channel_ready_future(ch) for a, ch in channels.items()}
    deadline = time.monotonic() + timeout
    down = []
    for address, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            future.cancel()
            down.append(address)
    return down


def _unreachable_message(down: list[str], timeout: float) -> str:
    starts = "; ".join(f"on {a.rpartition(':')[0]}: python -m tff_sim.worker --port {a.rpartition(':')[2]}"
                       for a in down)
    many = len(down) > 1
    return (f"TFF worker{'s' if many else ''} {', '.join(down)} not reachable (no gRPC connection within "
            f"{timeout:g} s). Start {'them' if many else 'it'} ({starts}), check the address and firewall, or "
            f"leave {'them' if many else 'it'} out of --workers.")


def run_summary(spec: str | None, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """For summary.json / report.md: the workers and the mean bytes per round over the rounds run on them."""
    rows = [r for r in history if r.get("workers")]
    if not spec or not rows:
        return None
    return {"addresses": list(parse_workers(spec)), "count": len(parse_workers(spec)), "rounds_on_workers": len(rows),
            "mean_bytes_to_workers": sum(r["bytes_to_workers"] for r in rows) / len(rows),
            "mean_bytes_from_workers": sum(r["bytes_from_workers"] for r in rows) / len(rows)}
