"""How a device reaches the server safely: the URL policy and the TLS verification of its connections.

    check_settings("https://fk.example:8443", pin_sha256="AA:BB:...")   # raises TransportPolicyError
    ca_context("server.pem")                                             # chain + hostname check
    pinned_context(fetch_certificate(host, port))                        # exactly that certificate

URL policy: plain http:// only to this machine (127.0.0.0/8, ::1, localhost), where nobody on the
network can read tokens and deltas; any other host needs https://. A device verifies an https
server with the system CAs, a CA file (--ca-file PEM: the usual chain verification with hostname
check), or a pin (--pin-sha256: the SHA-256 of the server's DER certificate, as
`python -m server --tls-self-signed` prints it).

Pinning happens before any request data leaves: the pinned transport first fetches the server's
certificate in a bare TLS handshake (no HTTP request), compares its fingerprint with the pin, and
only then connects with an SSL context that trusts exactly that certificate. A mismatch raises
`CertificatePinMismatch` naming both fingerprints; a certificate that changes later fails the
handshake of the trusting context, after which the pin is checked again (and the error says so).

The httpx transports that apply these contexts (make_transport, PinnedTransport,
CertificatePinMismatch) are in device_app/tls_transport.py. This module imports no httpx: the
keyboard checks its settings at start and loads the HTTP stack only when it first talks to the server.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

HANDSHAKE_TIMEOUT_S = 10.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TransportPolicyError(ValueError):
    """A server URL or TLS setting the device refuses; raised before any connection is attempted."""


# ---------------------------------------------------------------------- settings

def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits; accepts AA:BB:.., aa bb .., plain hex."""
    cleaned = re.sub(r"[\s:]", "", text or "").lower()
    if not _HEX64.fullmatch(cleaned):
        raise TransportPolicyError(
            f"not a SHA-256 fingerprint: {text!r} (want 64 hex digits, e.g. AA:BB:... as the server prints it)")
    return cleaned


def fingerprint_of_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.x.x) or localhost: traffic that never leaves this machine."""
    host = (host or "").strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_server_url(url: str) -> str:
    """The URL if the device may talk to it; TransportPolicyError with the reason otherwise."""
    parts = urlsplit((url or "").strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise TransportPolicyError(f"server URL {url!r}: want https://HOST[:PORT] (or http:// to this machine)")
    if scheme == "http" and not is_loopback_host(parts.hostname):
        raise TransportPolicyError(
            f"refusing plain http:// to {parts.hostname}: the device token and model updates would cross the "
            "network unencrypted. Use https:// and verify the server with --ca-file PEM or --pin-sha256 HEX "
            "(plain http is allowed only to 127.0.0.1, ::1 and localhost)")
    return url


def check_settings(url: str | None, ca_file: str | os.PathLike | None = None,
                   pin_sha256: str | None = None) -> tuple[str | None, str | None]:
    """Validate a device's server URL and TLS settings together; (ca_file as an absolute path, pin as
    lowercase hex). Raises TransportPolicyError. A CA file or pin needs an https:// URL, since over
    http they would verify nothing while looking as if they did."""
    ca = str(Path(ca_file).expanduser().resolve()) if ca_file else None
    pin = normalize_fingerprint(pin_sha256) if pin_sha256 else None
    if ca and pin:
        raise TransportPolicyError("give either a CA file or a pinned fingerprint, not both")
    if ca and not Path(ca).is_file():
        raise TransportPolicyError(f"CA file {ca} does not exist")
    if url:
        check_server_url(url)
        if (ca or pin) and urlsplit(url.strip()).scheme.lower() != "https":
            raise TransportPolicyError(
                f"{'--ca-file' if ca else '--pin-sha256'} needs an https:// server URL, not {url}")
    return ca, pin


def check_request_url(base_url: str, url: str) -> None:
    """An absolute URL the server handed out (e.g. a task's upload URL): the same policy, and no
    downgrade from an https base to plain http."""
    check_server_url(url)
    if urlsplit(base_url).scheme.lower() == "https" and urlsplit(url).scheme.lower() != "https":
        raise TransportPolicyError(f"refusing {url}: the server is https, a plain http URL would downgrade it")


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, with the scheme's default port filled in and the host lowercased."""
    parts = urlsplit((url or "").strip())
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").rstrip(".").lower(), port


def same_origin(base_url: str, url: str) -> bool:
    """Whether `url` is on the configured server's origin (scheme, host, port): only then does the device
    send its token. A task URL on another host or port, or plain http when the server is https, gets none."""
    return origin_of(base_url) == origin_of(url)


# ---------------------------------------------------------------------- verification

def ca_context(ca_file: str | os.PathLike) -> ssl.SSLContext:
    """Chain verification against exactly this CA file (not the system CAs), with hostname check."""
    return ssl.create_default_context(cafile=str(ca_file))


def fetch_certificate(host: str, port: int, timeout: float = HANDSHAKE_TIMEOUT_S) -> bytes:
    """The server's leaf certificate (DER) from a TLS handshake alone: no HTTP request is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only read the certificate; the pin decides whether to trust it
    with ssl_socket(host, port, ctx, timeout) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return der


def ssl_socket(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        server_name = None if _is_ip(host) else host  # SNI, as httpx sends it
        return ctx.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def pinned_context(der: bytes) -> ssl.SSLContext:
    """An SSL context that trusts exactly this certificate (the pin identifies the server, so the
    hostname is not checked: a self-signed certificate reached by a LAN address works)."""
    ctx = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # A pinned CA-issued leaf is not self-signed: let it anchor the chain on its own.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


__all__ = ["TransportPolicyError", "ca_context", "check_request_url", "origin_of", "same_origin",
           "check_server_url", "check_settings", "fetch_certificate", "fingerprint_of_der", "is_loopback_host",
           "normalize_fingerprint", "pinned_context"]
