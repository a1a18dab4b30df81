"""HTTP routes of Paillier rounds.

    GET  /v1/paillier/public_key             device  the key holder's signed public key
    POST /v1/rounds/{id}/paillier/input      device  binary FKPL frame (models.paillier_pack.encode_input)
"""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from server.contract import BODY_READ_REASONS, FRAME_REASONS, ApiInt, refusals
from server.http.auth_deps import AuthDeps
from server.http.helpers import BINARY_BODY, read_body
from server.paillier.service import PaillierService
from server.versions import ModelVersions


def add_paillier_routes(app: FastAPI, paillier: PaillierService, models: ModelVersions, deps: AuthDeps) -> None:
    device = deps.device

    @app.get("/v1/paillier/public_key", tags=["privacy"], responses=refusals("not_configured", "keyholder_unavailable"))
    def paillier_key(_: str = Depends(device)) -> dict[str, Any]:
        return paillier.public_key_info()

    @app.post("/v1/rounds/{round_id}/paillier/input", tags=["privacy"], openapi_extra=BINARY_BODY,
              responses=refusals(*BODY_READ_REASONS, "unknown_round", "not_admitted", "round_closed",
                                 "duplicate_upload", "not_configured", "keyholder_unavailable", *FRAME_REASONS,
                                 "bad_metadata"))
    async def paillier_input(round_id: ApiInt, request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Binary FKPL frame: the device's packed Paillier ciphertexts."""
        limit = models.max_upload_bytes * 4 + (1 << 20) if models.max_upload_bytes else 64 << 20
        body = await read_body(request, limit)
        return await run_in_threadpool(paillier.submit, device_id, round_id, body)


__all__ = ["add_paillier_routes"]
