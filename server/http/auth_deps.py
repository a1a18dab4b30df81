"""The app's three auth dependencies (device token, either token, admin token) as FastAPI dependencies.

Two bearer schemes on the same Authorization header, so the OpenAPI document says which token each
route takes (server/contract.py reads them back by identity)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.auth import Auth


@dataclasses.dataclass(frozen=True)
class AuthDeps:
    device: Callable[..., Any]  # -> the device id
    anyone: Callable[..., Any]  # a device or the admin
    admin: Callable[..., Any]

    def kinds(self) -> dict[Callable[..., Any], str]:
        """For server/contract.finish: which dependency is which auth."""
        return {self.device: "device", self.anyone: "any", self.admin: "admin"}


def auth_dependencies(auth: Auth) -> AuthDeps:
    device_bearer = HTTPBearer(auto_error=False, scheme_name="deviceToken",
                               description="a device's token from POST /v1/devices/register")
    admin_bearer = HTTPBearer(auto_error=False, scheme_name="adminToken",
                              description="the admin token (--admin-token, $FK_ADMIN_TOKEN or <data-dir>/admin_token)")

    def _header(creds: HTTPAuthorizationCredentials | None) -> str | None:
        return f"{creds.scheme} {creds.credentials}" if creds else None

    async def device(creds: HTTPAuthorizationCredentials | None = Depends(device_bearer)) -> str:
        # On the event loop (one indexed SQLite read), not a thread hop per request: device routes are
        # a cohort's many small messages and its uploads, which go to a worker thread anyway.
        return auth.require_device(_header(creds))

    def anyone(creds: HTTPAuthorizationCredentials | None = Depends(device_bearer),
               _admin: HTTPAuthorizationCredentials | None = Depends(admin_bearer)) -> str:
        return auth.require_any(_header(creds))  # both schemes read the one Authorization header

    def admin(creds: HTTPAuthorizationCredentials | None = Depends(admin_bearer)) -> None:
        auth.require_admin(_header(creds))

    return AuthDeps(device, anyone, admin)


__all__ = ["AuthDeps", "auth_dependencies"]
