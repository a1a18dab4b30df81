"""Device registration, bearer-token authentication, and the Sybil defences of registration.

A device registers once and receives an id and a 256-bit random token. Only SHA-256 of the token
is stored (a fast hash is enough for high-entropy random secrets; there is nothing to brute-force),
so a leaked database does not let anyone impersonate a device. Every later call sends
`Authorization: Bearer <token>`. Admin calls send the admin token the same way; it comes from
--admin-token or $FK_ADMIN_TOKEN, or is generated into <data_dir>/admin_token (mode 0600).

Registration (docs/security.md): it needs the registration key (--registration-key, $FK_REGISTRATION_KEY,
or generated into <data_dir>/registration_key, 0600) unless the server runs with --open-registration; each
source address has a token bucket (--registration-rate-per-s, --registration-burst: 429 rate_limited with
Retry-After); and at most --max-devices devices hold a valid token (403 device_cap_reached).
An admin can revoke a device (its token is refused with 401 unauthorized; the device may register again,
as a new device) or ban it (its token is refused with 403 banned, for good; lifting a ban leaves it revoked).
Both are stored (table device_blocks) and take effect on the device's next request, including the uploads
of a round it was admitted to before.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.db import Db
from server.errors import Rejection
from server.ratelimit import RateLimiter, retry_after_header

if TYPE_CHECKING:
    from server.config import ServerConfig

log = logging.getLogger("server.auth")

BLOCK_STATES = ("revoked", "banned")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def ensure_secret_file(path: Path) -> str:
    """The secret stored in `path`, or a new random one written there (mode 0600) on first use."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    secret = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created meanwhile by another process: use that one
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return secret


def ensure_admin_token(configured: str | None, data_dir: Path) -> str:
    """The configured admin token, or the one stored in the data dir (created on first use)."""
    return configured or ensure_secret_file(data_dir / "admin_token")


class RateLimited(Rejection):
    """429 rate_limited, with the Retry-After header value in `headers`."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__("rate_limited", detail)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": retry_after_header(retry_after_s)}


KNOWN_TOKENS_MAX = 1 << 18  # cached token lookups (~100 bytes each); the cache restarts when full


class Auth:
    """Tokens, registration and device blocks. `config` (or the one passed to `register`) sets the
    registration policy: open or keyed, the per-address rate limit and the device cap; without one,
    registration checks only `registration_key` (None: open)."""

    def __init__(self, db: Db, admin_token: str, registration_key: str | None = None, *,
                 config: ServerConfig | None = None) -> None:
        self.db = db
        self._admin_hash = hash_token(admin_token)
        self._config = config
        self._registration_key = registration_key
        if registration_key is None and config is not None and not config.open_registration:
            self._registration_key = config.resolve_registration_key()
        self._known: dict[str, str] = {}  # token hash -> device id, for tokens seen valid
        self._lock = threading.Lock()  # the counters, the limiter and the block table below
        self._blocked: dict[str, str] = db.device_blocks()  # device id -> revoked | banned
        self._in_good_standing = db.count_devices_in_good_standing()
        self._limiter: RateLimiter | None = None
        self._limiter_key: tuple[float, int] | None = None
        if self._registration_key is None and (config is None or config.open_registration):
            log.warning("registration is OPEN (--open-registration): anyone who reaches this server can register "
                        "devices; only the rate limit and the device cap bound fakes (docs/security.md)")

    # ------------------------------------------------------------------ registration
    @property
    def open_registration(self) -> bool:
        return self._registration_key is None

    def _policy(self, config: ServerConfig | None) -> ServerConfig | None:
        config = config or self._config
        if config is not None and self._registration_key is None and not config.open_registration:
            self._registration_key = config.resolve_registration_key()  # an embedded server without with_env
        return config

    def _limiter_for(self, config: ServerConfig | None) -> RateLimiter | None:
        if config is None or config.registration_rate_per_s <= 0:
            return None
        key = (float(config.registration_rate_per_s), int(config.registration_burst))
        with self._lock:
            if self._limiter is None or self._limiter_key != key:
                self._limiter, self._limiter_key = RateLimiter(*key), key
            return self._limiter

    def register(self, registration_key: str | None, source: str | None = None,
                 config: ServerConfig | None = None) -> tuple[str, str]:
        """A new device id and token. `source`: the client's address (rate limited per address);
        `config`: the registration policy when the Auth was built without one."""
        config = self._policy(config)
        limiter = self._limiter_for(config)
        if limiter is not None and source:
            wait = limiter.take(source)  # every attempt spends a token, right or wrong key
            if wait > 0:
                raise RateLimited(f"too many registrations from {source}; retry in {retry_after_header(wait)} s", wait)
        if self._registration_key is not None and not hmac.compare_digest(
            (registration_key or "").encode(), self._registration_key.encode()
        ):
            raise Rejection("registration_refused", "a valid registration_key is required to register")
        cap = config.max_devices if config is not None else 0
        with self._lock:
            if cap and self.db.shared:  # other server processes register and block devices too (--cluster)
                self._in_good_standing = self.db.count_devices_in_good_standing()
            if cap and self._in_good_standing >= cap:
                raise Rejection("device_cap_reached", f"this deployment has its maximum of {cap} registered devices")
            self._in_good_standing += 1  # reserved before the write, released if it fails
        device_id = "d_" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        try:
            with self.db.write():
                self.db.add_device(device_id, hash_token(token))
        except BaseException:
            with self._lock:
                self._in_good_standing -= 1
            raise
        return device_id, token

    def registration_status(self, config: ServerConfig | None = None) -> dict[str, Any]:
        """For the admin status: how devices register and how many hold a valid token."""
        config = self._policy(config)
        if self.db.shared:
            states, good = list(self.db.device_blocks().values()), self.db.count_devices_in_good_standing()
        else:
            with self._lock:
                states = list(self._blocked.values())
                good = self._in_good_standing
        return {"mode": "open" if self.open_registration else "key",
                "devices_in_good_standing": good,
                "revoked": states.count("revoked"), "banned": states.count("banned"),
                "max_devices": config.max_devices if config is not None else None,
                "rate_per_s": config.registration_rate_per_s if config is not None else None,
                "burst": config.registration_burst if config is not None else None}

    # ------------------------------------------------------------------ revoke / ban
    def set_block(self, device_id: str, state: str | None, reason: str | None = None) -> dict[str, Any]:
        """Revoke ("revoked") or ban ("banned") a device, effective at its next request; None lifts a
        block only as far as "revoked" would (a lifted ban leaves the token refused: the device registers
        again). A banned device stays banned when revoked. Durable (table device_blocks)."""
        if state not in (*BLOCK_STATES, None):
            raise ValueError(f"unknown block state {state!r}")
        with self._lock:
            row = self.db.get_device(device_id)
            if row is None:
                raise Rejection("unknown_device", f"no device {device_id}")
            before = row["state"]
            after = state
            if state is None:
                after = "revoked" if before == "banned" else before  # lifting a ban: the token stays invalid
            elif state == "revoked" and before == "banned":
                after = "banned"  # a ban is not weakened by a revoke
            if after != before or (after is not None and reason and reason != row["reason"]):
                with self.db.write():
                    self.db.set_device_block(device_id, after, reason)
            if after is None:
                self._blocked.pop(device_id, None)
            else:
                self._blocked[device_id] = after
            if before is None and after is not None:
                self._in_good_standing -= 1
            # the cache of valid tokens: this device's entries go at once
            for digest in [d for d, dev in self._known.items() if dev == device_id]:
                del self._known[digest]
        log.warning("device %s: %s -> %s%s", device_id, before or "ok", after or "ok", f" ({reason})" if reason else "")
        return {"device_id": device_id, "state": after or "ok", "previous": before or "ok", "reason": reason}

    def device_view(self, device_id: str) -> dict[str, Any]:
        row = self.db.get_device(device_id)
        if row is None:
            raise Rejection("unknown_device", f"no device {device_id}")
        return {"device_id": row["id"], "created_at": row["created_at"], "last_seen": row["last_seen"],
                "state": row["state"] or "ok", "reason": row["reason"], "blocked_at": row["blocked_at"]}

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
        # (--cluster: another process may have blocked it, so the table is asked, not this process's copy)
        state = self.db.device_block_state(device) if self.db.shared else self._blocked.get(device)
        if state == "banned":
            raise Rejection("banned", "this device is banned: its token is refused for good")
        if state == "revoked":
            raise Rejection("unauthorized", "revoked device token: register again")
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
