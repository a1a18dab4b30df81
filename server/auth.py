"""Device registration and bearer-token authentication.

A device registers once and receives an id and a 256-bit random token. Only SHA-256 of the token
is stored (a fast hash is enough for high-entropy random secrets; there is nothing to brute-force),
so a leaked database does not let anyone impersonate a device. Every later call sends
`Authorization: Bearer <token>`. Admin calls send the admin token the same way; it comes from
--admin-token or $FK_ADMIN_TOKEN, or is generated into <data_dir>/admin_token (mode 0600).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from server.db import Db
from server.errors import Rejection


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def ensure_admin_token(configured: str | None, data_dir: Path) -> str:
    """The configured admin token, or the one stored in the data dir (created on first use)."""
    if configured:
        return configured
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


KNOWN_TOKENS_MAX = 1 << 18  # cached token lookups (~100 bytes each); the cache restarts when full


class Auth:
    def __init__(self, db: Db, admin_token: str, registration_key: str | None = None) -> None:
        self.db = db
        self._admin_hash = hash_token(admin_token)
        self._registration_key = registration_key
        self._known: dict[str, str] = {}  # token hash -> device id, for tokens seen valid

    def register(self, registration_key: str | None) -> tuple[str, str]:
        if self._registration_key is not None and not hmac.compare_digest(
            (registration_key or "").encode(), self._registration_key.encode()
        ):
            raise Rejection("registration_refused", "a valid registration_key is required to register")
        device_id = "d_" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        with self.db.write():
            self.db.add_device(device_id, hash_token(token))
        return device_id, token

    def is_admin(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(hash_token(token), self._admin_hash)

    def device_for(self, token: str | None) -> str | None:
        if not token:
            return None
        digest = hash_token(token)
        device = self._known.get(digest)
        if device is None:
            row = self.db.device_by_token_hash(digest)
            if row is None:
                return None
            device = row["id"]
            if len(self._known) >= KNOWN_TOKENS_MAX:
                self._known.clear()
            self._known[digest] = device  # a token's device never changes (tokens are not reissued)
        return device

    def require_device(self, authorization: str | None) -> str:
        token = bearer_token(authorization)
        if token is None:
            raise Rejection("unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        device = self.device_for(token)
        if device is None:
            raise Rejection("unauthorized", "unknown or revoked device token")
        return device

    def require_admin(self, authorization: str | None) -> None:
        token = bearer_token(authorization)
        if token is None:
            raise Rejection("unauthorized", "missing bearer token (Authorization: Bearer <admin token>)")
        if self.is_admin(token):
            return
        if self.device_for(token) is not None:
            raise Rejection("forbidden", "device tokens cannot call admin endpoints")
        raise Rejection("unauthorized", "invalid admin token")

    def require_any(self, authorization: str | None) -> str:
        """A device id, or "admin" for the admin token (model downloads)."""
        token = bearer_token(authorization)
        if token is not None and self.is_admin(token):
            return "admin"
        return self.require_device(authorization)
