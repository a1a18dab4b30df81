"""Bounded requests (issue #18): a pure ASGI middleware in front of every route.

Each request gets a body limit from its route class (tiny for JSON control routes and unauthenticated ones,
model-sized only for the upload routes), enforced while the body is read: a declared Content-Length over the
limit is refused before a byte is read, and a body that grows past it is cut at the message that crosses
it, so nothing past the limit is ever buffered (413 too_large). A body that stalls (no byte for
body_idle_timeout_s, or averaging under body_min_rate bytes/s after that grace) is cut with 408
read_timeout. One device token holds at most max_uploads_per_device upload bodies and
max_long_polls_per_device long-polls (?wait=) at once (429 too_many_concurrent). A `preflight` hook (the
app's) refuses before the body is read: the admin token of admin routes with large bodies, the token and
admission of a device that uploads to a round or asks to wait on it.

A refusal is the app's JSON {"error": reason, "detail": "..."}. Any answer sent before the body was read to
its end carries `Connection: close`, so the server stops reading the rest of it (uvicorn would otherwise
read and drop it to keep the connection alive).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qs

from server.errors import REASONS, Rejection

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_REASONS = ("too_large", "read_timeout")  # any route that reads a body
CONCURRENCY_REASON = "too_many_concurrent"
RETRY_AFTER_BUSY_S = 5  # a device over its concurrency limit: retry once one of its requests ended


@dataclasses.dataclass(frozen=True)
class RouteClass:
    """What a group of routes may receive."""
    name: str
    limit: Callable[[], int]  # body bytes (a callable: upload sizes follow the model, set at init)
    upload: bool = False  # counts toward the device's concurrent uploads
    admin_first: bool = False  # the admin token is checked before the body is read


@dataclasses.dataclass(frozen=True)
class Rule:
    method: str
    pattern: re.Pattern[str]
    route: RouteClass


@dataclasses.dataclass(frozen=True)
class LimitSettings:
    idle_timeout_s: float  # no body byte for this long: 408
    min_rate: float  # bytes/s a body must average after idle_timeout_s of grace (0: no minimum)
    uploads_per_device: int
    long_polls_per_device: int


def rule(method: str, path: str, route: RouteClass) -> Rule:
    """A route class for the paths matching `path` (a regex; {id} stands for a round id)."""
    return Rule(method, re.compile("^" + path.replace("{id}", r"-?\d+") + "$"), route)


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared body size: None without one; a malformed or absurd value counts as huge (never
    int() on a client's 5,000 digits)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() and len(value) <= 18 else 1 << 62
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def long_poll(scope: Scope) -> bool:
    """Whether the request asks to wait (?wait=S with S > 0): it may hold a connection for S seconds."""
    query = scope.get("query_string", b"").decode("latin-1")
    if "wait" not in query:
        return False
    for value in parse_qs(query).get("wait", ()):
        try:
            if float(value) > 0:
                return True
        except ValueError:  # FastAPI answers it (422)
            pass
    return False


class _Exchange:
    """One request's body reader and response writer: counts and times the body, sends refusals, and
    drops the app's own answer once a refusal went out."""

    def __init__(self, receive: Receive, send: Send, limit: int, settings: LimitSettings, has_body: bool,
                 on_refuse: Callable[[str], None]) -> None:
        self._receive, self._send = receive, send
        self.limit, self.settings, self.on_refuse = limit, settings, on_refuse
        self.body_done = not has_body  # the body was read to its end (or there is none)
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for body bytes
        self.started = False  # a response has started
        self.refused = False  # our refusal is the response

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:  # e.g. waiting for a disconnect: not a body read, not timed
            return await self._receive()
        s = self.settings
        budget = s.idle_timeout_s
        if s.min_rate > 0:  # the whole body's time: grace + bytes / min_rate (a trickle runs out)
            budget = min(budget, s.idle_timeout_s + self.received / s.min_rate - self.waited)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(budget, 0.0))
        except asyncio.TimeoutError:
            await self.refuse("read_timeout", f"request body stalled after {self.received} bytes (no byte for "
                                              f"{s.idle_timeout_s:g} s, or under {s.min_rate:g} bytes/s)")
            return {"type": "http.disconnect"}
        finally:
            self.waited += loop.time() - t0
        if message["type"] != "http.request":
            self.body_done = True  # the client went away
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            await self.refuse("too_large", f"request body over this route's limit of {self.limit} bytes "
                                           f"(refused after reading {self.received})")
            return {"type": "http.disconnect"}
        if not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # our refusal already answered; the app's answer to the disconnect is dropped
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_done:
                # answered before the body ended: close, or the server reads (and drops) the rest of it
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await self._send(message)

    async def refuse(self, reason: str, detail: str, headers: Iterable[tuple[bytes, bytes]] = (),
                     status: int | None = None) -> None:
        """Answer with the refusal now (if no answer started yet); later app messages are dropped."""
        status = status or REASONS[reason]
        self.on_refuse(reason)
        if self.started:
            self.refused = True
            return
        body = json.dumps({"error": reason, "detail": detail}).encode()
        extra = list(headers)
        if not self.body_done:
            extra.append((b"connection", b"close"))
        if status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode()), *extra]})
        await self._send({"type": "http.response.body", "body": body})
        self.started = self.refused = True


class BodyLimits:
    """The middleware. `rules` classify requests (first match); others get `default`. `preflight(scope,
    route, long_poll)` may raise Rejection before the body is read. `on_refuse(reason)` counts refusals."""

    def __init__(self, app: ASGIApp, *, rules: list[Rule], default: RouteClass, settings: LimitSettings,
                 preflight: Callable[[Scope, RouteClass, bool], None] | None = None,
                 on_refuse: Callable[[str], None] | None = None) -> None:
        self.app, self.rules, self.default, self.settings = app, rules, default, settings
        self.preflight = preflight
        self.on_refuse = on_refuse or (lambda reason: None)
        self._held: dict[tuple[str, str], int] = {}  # (kind, token digest) -> requests in flight

    def classify(self, method: str, path: str) -> RouteClass:
        for r in self.rules:
            if r.method == method and r.pattern.match(path):
                return r.route
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.classify(scope["method"], scope["path"])
        limit = route.limit()
        headers = scope.get("headers", ())
        declared = content_length(headers)
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
        ex = _Exchange(receive, send, limit, self.settings, has_body=chunked or bool(declared),
                       on_refuse=self.on_refuse)
        if declared is not None and declared > limit:
            await ex.refuse("too_large", f"request body of {declared} bytes is over this route's limit of {limit}")
            return
        polling = long_poll(scope)
        if self.preflight is not None:
            try:
                self.preflight(scope, route, polling)
            except Rejection as exc:
                extra = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                         for k, v in (getattr(exc, "headers", None) or {}).items()]
                await ex.refuse(exc.reason, exc.detail, extra, status=exc.status)
                return
        held = self._hold(scope, route, polling)
        if held is None:
            await ex.refuse(CONCURRENCY_REASON, "this device already has its maximum of concurrent "
                            f"{'uploads' if route.upload else 'long-polls'} in flight; retry when one ended",
                            [(b"retry-after", str(RETRY_AFTER_BUSY_S).encode())])
            return
        try:
            await self.app(scope, ex.receive, ex.send)
        except Exception:
            if not ex.refused:
                raise
            # the app's reaction to the disconnect we fed it after our refusal (e.g. FastAPI's ClientDisconnect)
        finally:
            for key in held:
                self._release(key)

    # ------------------------------------------------------------------ per-device concurrency
    def _hold(self, scope: Scope, route: RouteClass, polling: bool) -> list[tuple[str, str]] | None:
        """Count this request against its device's limits: the keys held, or None when over one.
        Keyed by the bearer token's digest: an unknown token holds a count only until its 401."""
        authorization = _header(scope, b"authorization")
        if not authorization:
            return []
        digest = hashlib.sha256(authorization.encode("utf-8", "replace")).hexdigest()[:32]
        wanted = []
        if route.upload:
            wanted.append((("upload", digest), self.settings.uploads_per_device))
        if polling:
            wanted.append((("poll", digest), self.settings.long_polls_per_device))
        if any(self._held.get(key, 0) >= cap for key, cap in wanted):
            return None
        for key, _ in wanted:
            self._held[key] = self._held.get(key, 0) + 1
        return [key for key, _ in wanted]

    def _release(self, key: tuple[str, str]) -> None:
        left = self._held.get(key, 0) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)


def route_reasons(method: str, path: str, query_params: Iterable[str], middleware_rules: list[Rule]) -> set[str]:
    """The refusals this middleware adds to a route (for its OpenAPI document): body limits and read
    timeout on routes with a body, the concurrency limit on uploads and long-polls."""
    reasons: set[str] = set()
    concrete = re.sub(r"\{[^}]*\}", "0", path)
    if method in ("POST", "PUT", "PATCH"):
        reasons.update(BODY_REASONS)
    upload = any(r.method == method and r.pattern.match(concrete) and r.route.upload for r in middleware_rules)
    if upload or "wait" in query_params:
        reasons.add(CONCURRENCY_REASON)
    return reasons


__all__ = ["BODY_REASONS", "CONCURRENCY_REASON", "BodyLimits", "LimitSettings", "RouteClass", "Rule", "content_length",
           "long_poll", "route_reasons", "rule"]
