"""The httpx transports of a device's connections, verifying the server as device_app/transport.py
decides: the system CAs, a CA file, or a pinned certificate (PinnedTransport).

    httpx.Client(transport=make_transport(ca_file="server.pem"))         # chain + hostname check
    httpx.Client(transport=make_transport(pin_sha256="aabb..."))         # exactly that certificate

Apart from transport.py (the URL policy and the SSL contexts, no httpx) so that the keyboard imports
httpx only when it first talks to the server (ServerAPI, device_app/http_client.py), not at start.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading

import httpx

from device_app.transport import (HANDSHAKE_TIMEOUT_S, TransportPolicyError, ca_context, fetch_certificate,
                                  fingerprint_of_der, normalize_fingerprint, pinned_context)

log = logging.getLogger("device_app.transport")

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's defaults


class CertificatePinMismatch(httpx.TransportError):
    """The server presented a certificate other than the pinned one; nothing was sent to it."""

    def __init__(self, origin: str, expected: str, presented: str) -> None:
        super().__init__(
            f"certificate pin mismatch for {origin}: pinned SHA-256 {expected}, the server presented {presented}; "
            "nothing was sent (if the server's certificate really changed, pin the new fingerprint)")
        self.origin = origin
        self.expected = expected
        self.presented = presented


def _is_certificate_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class PinnedTransport(httpx.BaseTransport):
    """httpx transport that talks only to a server whose certificate has the pinned SHA-256.

    Per origin (host, port), the first request fetches and checks the certificate, then one
    httpx.HTTPTransport trusting exactly it carries the requests (connection pooling as usual)."""

    def __init__(self, pin_sha256: str, *, limits: httpx.Limits = DEFAULT_LIMITS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.pin = normalize_fingerprint(pin_sha256)
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self._inner: dict[tuple[str, int], httpx.HTTPTransport] = {}
        self._lock = threading.Lock()

    def _transport_for(self, url: httpx.URL) -> httpx.HTTPTransport:
        if url.scheme != "https":
            # Never reached through ServerAPI (the URL policy refuses it first); here for direct use.
            raise TransportPolicyError(f"a pinned connection needs https://, not {url}")
        origin = (url.host, url.port or 443)
        with self._lock:
            inner = self._inner.get(origin)
            if inner is not None:
                return inner
            try:
                der = fetch_certificate(origin[0], origin[1], self.handshake_timeout)
            except (OSError, ssl.SSLError) as exc:  # unreachable: the caller's offline path
                raise httpx.ConnectError(f"TLS handshake with {origin[0]}:{origin[1]} failed: {exc}") from exc
            presented = fingerprint_of_der(der)
            if presented != self.pin:
                raise CertificatePinMismatch(f"{origin[0]}:{origin[1]}", self.pin, presented)
            inner = self._inner[origin] = httpx.HTTPTransport(verify=pinned_context(der), limits=self.limits)
            return inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._transport_for(request.url)
        try:
            return inner.handle_request(request)
        except httpx.ConnectError as exc:
            if not _is_certificate_failure(exc):
                raise
            # The server now presents another certificate: check the new one against the pin, so a
            # mismatch is reported as such rather than as a dead network.
            origin = (request.url.host, request.url.port or 443)
            log.warning("%s:%s no longer presents the certificate checked earlier; checking the pin again", *origin)
            with self._lock:
                if self._inner.get(origin) is inner:
                    del self._inner[origin]
            inner.close()
            self._transport_for(request.url)  # raises CertificatePinMismatch unless it still matches
            raise

    def close(self) -> None:
        with self._lock:
            inners, self._inner = list(self._inner.values()), {}
        for inner in inners:
            inner.close()


def make_transport(*, ca_file: str | os.PathLike | None = None, pin_sha256: str | None = None,
                   limits: httpx.Limits = DEFAULT_LIMITS) -> httpx.BaseTransport:
    """The transport for a device's httpx.Client: pinned, CA-file verified, or the system CAs."""
    if ca_file and pin_sha256:
        raise TransportPolicyError("give either a CA file or a pinned fingerprint, not both")
    if pin_sha256:
        return PinnedTransport(pin_sha256, limits=limits)
    if ca_file:
        return httpx.HTTPTransport(verify=ca_context(ca_file), limits=limits)
    return httpx.HTTPTransport(limits=limits)


__all__ = ["CertificatePinMismatch", "DEFAULT_LIMITS", "PinnedTransport", "make_transport"]
