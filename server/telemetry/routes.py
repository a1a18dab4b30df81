"""HTTP routes of randomized-response telemetry.

    GET  /v1/telemetry/config   device   {questions, coins: {p_first, p_second}, local_epsilon, period_s}
    POST /v1/telemetry/rr       device   {coins: {p_first, p_second}, answers: {question: bool}}
                                         -> {"status": "accepted", period, questions}
    GET  /v1/admin/telemetry    admin    per question: reports, yes, yes_rate, rate (de-biased), stderr,
                                         95% CI, local epsilon per answer, coins
"""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from server.contract import refusals
from server.http.auth_deps import AuthDeps
from server.http.helpers import json_body, json_object, json_safe
from server.telemetry.service import Telemetry


def add_telemetry_routes(app: FastAPI, telemetry: Telemetry, deps: AuthDeps) -> None:
    device = deps.device

    @app.get("/v1/telemetry/config", tags=["privacy"])
    def telemetry_config(_: str = Depends(device)) -> dict[str, Any]:
        return telemetry.public_config()

    @app.post("/v1/telemetry/rr", tags=["privacy"], openapi_extra=json_body(
        {"coins": {"type": "object", "properties": {"p_first": {"type": "number"}, "p_second": {"type": "number"}}},
         "answers": {"type": "object", "additionalProperties": {"type": "boolean"}}}, ("coins", "answers")),
              responses=refusals("bad_request", "coins_mismatch", "already_reported"))
    async def telemetry_report(request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        body = await json_object(request)
        return await run_in_threadpool(telemetry.report, device_id, body)

    @app.get("/v1/admin/telemetry", tags=["admin"], dependencies=[Depends(deps.admin)])
    def admin_telemetry() -> dict[str, Any]:
        return json_safe(telemetry.summary())


__all__ = ["add_telemetry_routes"]
