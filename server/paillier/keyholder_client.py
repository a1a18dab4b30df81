"""The aggregation server's client of the separate key holder (server/keyholder.py): its public key,
fetched once and checked against its own signature, and the decryption of a round's sum."""
from __future__ import annotations

import threading
from typing import Any

import httpx

from models import paillier_pack as pp
from models import secagg_math as sm
from server.errors import Rejection, SecureAggregationFailed


class KeyHolderClient:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url, self.token = url, token
        self._key: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def public_key_info(self) -> dict[str, Any]:
        """The key holder's public key (fetched once; its self-signature checked)."""
        with self._lock:
            if self._key is None:
                if not self.url:
                    raise Rejection("not_configured", "no Paillier key holder configured (--paillier-keyholder-url)")
                try:
                    info = httpx.get(self.url.rstrip("/") + "/v1/public_key", timeout=30.0).json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise Rejection("keyholder_unavailable", f"cannot reach the key holder: {exc}", status=503) from None
                key = pp.PublicKey.from_dict(info)
                if not sm.verify(sm.unb64(info["verify_key"], 32), sm.unb64(info["signature"], 64),
                                 key.signed_message()):
                    raise Rejection("keyholder_unavailable", "key holder's public key signature does not verify",
                                    status=503)
                self._key = info
            return self._key

    def public_key(self) -> pp.PublicKey:
        return pp.PublicKey.from_dict(self.public_key_info())

    def decrypt(self, request: bytes) -> bytes:
        """The key holder's answer to a decryption request. A refusal (4xx: count, replay, token, or a
        malformed request) is SecureAggregationFailed, never retried; anything else (5xx) raises
        httpx.HTTPStatusError, retried by the round worker."""
        r = httpx.post(self.url.rstrip("/") + "/v1/decrypt", content=request,
                       timeout=httpx.Timeout(3600.0, connect=10.0),
                       headers={"Authorization": f"Bearer {self.token or ''}",
                                "Content-Type": "application/octet-stream"})
        if 400 <= r.status_code < 500:
            try:
                err = r.json()
            except ValueError:
                err = {"error": f"http_{r.status_code}", "detail": r.text[:200]}
            raise SecureAggregationFailed(f"keyholder_{err.get('error')}", str(err.get("detail", "")))
        r.raise_for_status()
        return r.content


__all__ = ["KeyHolderClient"]
