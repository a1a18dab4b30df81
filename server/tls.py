"""HTTPS for the server: a given certificate + key, or a self-signed pair kept in the data dir.

    python -m server --tls-cert cert.pem --tls-key key.pem     # a certificate from your CA
    python -m server --tls-self-signed                         # <data_dir>/tls_cert.pem + tls_key.pem

The self-signed pair is created once and reused on every restart, so its SHA-256 fingerprint (of
the DER certificate) stays what devices pinned (`python -m device_app --pin-sha256 HEX`) or what
they verify with as a CA file (`--ca-file <data_dir>/tls_cert.pem`). Its subject alternative
names cover the bind host, localhost, 127.0.0.1 and ::1 (and this machine's hostname), so
CA-file verification with its hostname check passes for the usual ways of reaching the server.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("server.tls")

CERT_NAME = "tls_cert.pem"
KEY_NAME = "tls_key.pem"
VALID_DAYS = 3650  # a pinned certificate must not expire under the devices that pinned it
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def self_signed_paths(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Where --tls-self-signed keeps its certificate and key."""
    root = Path(data_dir)
    return root / CERT_NAME, root / KEY_NAME


def default_hosts(bind_host: str) -> list[str]:
    """Names the self-signed certificate covers: the bind host (unless a wildcard), loopback, hostname."""
    hosts = [] if bind_host in _WILDCARD_HOSTS else [bind_host]
    for name in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        if name and name not in hosts:
            hosts.append(name)
    return hosts


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (0600 from creation, not chmod-ed afterwards)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_self_signed(cert_path: str | os.PathLike, key_path: str | os.PathLike, hosts: list[str],
                       days: int = VALID_DAYS) -> x509.Certificate:
    """A new ECDSA P-256 key (mode 0600) and a self-signed certificate for `hosts` (SAN)."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "fk-server"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "federated keyboard server (self-signed)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    # CA:TRUE so that OpenSSL accepts the certificate as its own trust anchor when devices use it as
    # their CA file; path length 0 and the key never leaving the data dir keep it from signing others
    # usefully. Key identifiers and key usage make it pass strict (RFC 5280) verification too.
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew between server and devices
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    # The key first: a certificate on disk means its key is complete (see ensure_self_signed).
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    tmp = cert_path.with_name(cert_path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)
    return cert


def load_certificate(path: str | os.PathLike) -> x509.Certificate:
    """The first (leaf) certificate of a PEM file."""
    data = Path(path).read_bytes()
    certs = x509.load_pem_x509_certificates(data)  # raises ValueError on a file without any
    return certs[0]


def fingerprint_sha256(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER certificate, lowercase hex (what devices pin)."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def format_fingerprint(hex_digest: str) -> str:
    """AA:BB:... (how browsers and `openssl x509 -fingerprint` show it)."""
    return ":".join(hex_digest[i:i + 2] for i in range(0, len(hex_digest), 2)).upper()


def san_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def ensure_self_signed(data_dir: str | os.PathLike, bind_host: str) -> tuple[Path, Path, bool]:
    """(cert, key, created): the data dir's self-signed pair, created on first use and reused after."""
    cert_path, key_path = self_signed_paths(data_dir)
    if cert_path.exists() and key_path.exists():
        if key_path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; restricting it to its owner (0600)", key_path)
            os.chmod(key_path, 0o600)
        cert = load_certificate(cert_path)
        if bind_host not in _WILDCARD_HOSTS and bind_host not in san_hosts(cert):
            # Regenerating would change the fingerprint devices pinned; CA-file devices need the names.
            log.warning("the self-signed certificate %s does not name %s (it names %s): devices verifying it "
                        "as a CA file must connect by one of those names (pinned devices are unaffected)",
                        cert_path, bind_host, ", ".join(san_hosts(cert)))
        return cert_path, key_path, False
    create_self_signed(cert_path, key_path, default_hosts(bind_host))
    return cert_path, key_path, True


def check_pair(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> None:
    """Raise (ssl.SSLError, OSError, ValueError) unless the certificate and key load and belong together."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    load_certificate(cert_path)


__all__ = ["CERT_NAME", "KEY_NAME", "check_pair", "create_self_signed", "default_hosts", "ensure_self_signed",
           "fingerprint_sha256", "format_fingerprint", "load_certificate", "san_hosts", "self_signed_paths"]
