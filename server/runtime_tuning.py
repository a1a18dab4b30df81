"""Process-level tuning for ingesting multi-megabyte uploads; every step is best effort.

A 5.7 MB gboard delta is copied several times between the socket and the handler. These steps
remove what the server does not need: fresh page-faulting mmaps for every buffer and uvicorn's
per-chunk re-buffering of the request body. Each one checks that the library
still looks the way it assumes and otherwise leaves it alone (behaviour is unchanged, only slower).
"""
from __future__ import annotations

import ctypes
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)


def tune_malloc() -> None:
    """Keep multi-megabyte buffers (request bodies, decoded deltas) in the heap and reuse them.

    glibc serves such allocations with fresh mmaps by default and returns them on free, so every
    5.7 MB upload would page-fault and zero its buffers anew. Linux/glibc only.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _BodyParts:
    """Stands in for uvicorn's per-request `bytearray` body buffer: keeps the parser's chunks as
    they are instead of copying each into a bytearray and the bytearray into a new bytes object."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def __iadd__(self, chunk: bytes) -> "_BodyParts":
        self.parts.append(bytes(chunk))  # no copy for bytes; a copy only for a borrowed buffer
        self.size += len(chunk)
        return self

    def __len__(self) -> int:
        return self.size

    def take(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def _zero_copy_cycle(base: type) -> type:
    class ZeroCopyCycle(base):  # type: ignore[misc, valid-type]
        """uvicorn's httptools RequestResponseCycle, handing body chunks to the app uncopied."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.body = _BodyParts()

        async def receive(self) -> dict[str, Any]:
            # Same steps as the base class's receive(); only the body hand-over differs.
            if self.waiting_for_100_continue and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.waiting_for_100_continue = False
            if not self.disconnected and not self.response_complete:
                self.flow.resume_reading()
                await self.message_event.wait()
                self.message_event.clear()
            if self.disconnected or self.response_complete:
                return {"type": "http.disconnect"}
            message = {"type": "http.request", "body": self.body.take(), "more_body": self.more_body}
            self.body = _BodyParts()
            return message

    return ZeroCopyCycle


_EXPECTED_RECEIVE = ("bytes(self.body)", "self.body = bytearray()", "self.flow.resume_reading()",
                     "self.message_event.wait()", "waiting_for_100_continue")


def tune_uvicorn_body() -> bool:
    """Install the zero-copy body hand-over in uvicorn's httptools protocol when its receive() is the
    one this was written against (uvicorn 0.3x-0.5x). Returns whether it was installed."""
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # httptools not installed: uvicorn uses h11 and nothing changes
        return False
    base = getattr(httptools_impl, "RequestResponseCycle", None)
    if base is None or getattr(base, "_fk_zero_copy", False):
        return bool(base)
    try:
        source = inspect.getsource(base.receive) + inspect.getsource(base.__init__)
        on_body = inspect.getsource(httptools_impl.HttpToolsProtocol.on_body)
    except (OSError, TypeError, AttributeError):
        return False
    if not all(s in source for s in _EXPECTED_RECEIVE) or "self.cycle.body += body" not in on_body:
        log.info("uvicorn's request cycle is not the expected one; body hand-over left as it is")
        return False
    cycle = _zero_copy_cycle(base)
    cycle._fk_zero_copy = True
    httptools_impl.RequestResponseCycle = cycle
    return True


def tune_all() -> None:
    tune_malloc()
    tune_uvicorn_body()
