"""Device routes: registration, the model and vocabulary, check-in, uploads, evaluation reports."""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.contract import BODY_READ_REASONS, WIRE_REASONS, ApiInt, refusals
from server.errors import Rejection
from server.http.auth_deps import AuthDeps
from server.http.helpers import (DRAIN_LIMIT, RAW_BODY, WIRE_ANSWER, WIRE_MEDIA_TYPE, etag, etag_matches,
                                 json_safe, read_body)
from server.services import Services


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registration_key: str | None = None
    platform: str | None = Field(None, max_length=64)


class Eligibility(BaseModel):
    charging: bool = False
    unmetered: bool = False
    idle: bool = False


class CheckinRequest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    eligibility: Eligibility = Eligibility()
    model_version: ApiInt | None = None


class EvalResult(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_version: ApiInt
    num_examples: ApiInt
    recall: float = Field(allow_inf_nan=False)
    loss: float = Field(allow_inf_nan=False)
    metrics: dict[str, float] = {}


class EvalReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    results: list[EvalResult] = Field(min_length=1, max_length=4)


def add_device_routes(app: FastAPI, services: Services, deps: AuthDeps) -> None:
    config, manager, models, auth = services.config, services.manager, services.models, app.state.auth
    device, anyone = deps.device, deps.anyone

    @app.post("/v1/devices/register", status_code=201, tags=["device"],
              responses=refusals("registration_refused", "rate_limited", "device_cap_reached"))
    def register(request: Request, body: RegisterRequest | None = None) -> dict[str, Any]:
        """Register a device: returns its id and bearer token (shown once; the server keeps only a hash).
        Needs the registration key unless the server runs with --open-registration; rate limited per
        source address (429 rate_limited with Retry-After) and capped (--max-devices)."""
        device_id, token = auth.register(body.registration_key if body else None,
                                         source=request.client.host if request.client else None)
        services.metrics.inc("fk_registrations_total")
        return {"device_id": device_id, "token": token, "global_version": models.global_version(),
                "config_hash": models.model_config.config_hash() if models.initialized else None}

    @app.get("/v1/model/info", tags=["device"], responses=refusals("not_initialized"))
    def model_info(_: str = Depends(anyone)) -> dict[str, Any]:
        """The deployment's model config and vocabulary hash, the global and candidate versions, and the
        population privacy guarantee of the global model (epsilon, delta, accountant, DP settings)."""
        models.require_initialized()
        privacy = manager.account.report()
        return {"config": models.model_config.to_dict(), "config_hash": models.model_config.config_hash(),
                "num_parameters": models.dim, "vocab_hash": models.vocab.content_hash(),
                "vocab_size": len(models.vocab), "global_version": models.global_version(),
                "candidate_version": models.candidate_version(), "dp_mode": privacy["dp_mode"],
                "training_enabled": models.training_enabled(), "upload_dtypes": list(config.upload_dtypes),
                "max_upload_bytes": models.max_upload_bytes, "secure_aggregation": config.secure_aggregation,
                "privacy": privacy}

    @app.get("/v1/model/vocab", tags=["device"], response_class=JSONResponse,
             responses={**refusals("not_initialized"), 304: WIRE_ANSWER[304]})
    def model_vocab(if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """The vocabulary as models.vocab JSON (format_version, hash, tokens); ETag = its hash."""
        models.require_initialized()
        tag = f'"{models.vocab.content_hash()}"'
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if etag_matches(if_none_match, tag):
            return Response(status_code=304, headers=headers)
        return JSONResponse(models.vocab.to_dict(), headers=headers)

    def serve_model(version: int, if_none_match: str | None, immutable: bool) -> Response:
        blob, sha = models.model_blob(version)
        tag = etag(sha)
        headers = {"ETag": tag, "X-Model-Version": str(version),
                   "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
        if etag_matches(if_none_match, tag):
            services.metrics.inc("fk_model_downloads_total", {"status": "304"})
            return Response(status_code=304, headers=headers)
        services.metrics.inc("fk_model_downloads_total", {"status": "200"})
        return Response(blob, media_type=WIRE_MEDIA_TYPE, headers=headers)

    @app.get("/v1/models/current", tags=["device"], response_class=Response,
             responses={**WIRE_ANSWER, **refusals("not_initialized")})
    def model_current(if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """The global model as wire bytes (kind weights, header model_version = version). Honors If-None-Match."""
        models.require_initialized()
        return serve_model(models.global_version(), if_none_match, immutable=False)

    @app.get("/v1/models/{version}", tags=["device"], response_class=Response,
             responses={**WIRE_ANSWER, **refusals("not_initialized", "unknown_version")})
    def model_version(version: ApiInt, if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """Any stored version (global, earlier, or a candidate under evaluation) as wire bytes."""
        models.require_initialized()
        return serve_model(version, if_none_match, immutable=True)

    @app.post("/v1/checkin", tags=["device"])
    def checkin(body: CheckinRequest, device_id: str = Depends(device)) -> JSONResponse:
        """Eligibility + model version in; a train/evaluate task or retry-after out."""
        answer = manager.checkin(device_id, body.eligibility.model_dump(), body.model_version)
        headers = {"Retry-After": str(answer["retry_after"])} if answer["action"] == "retry" else {}
        return JSONResponse(answer, headers=headers)

    @app.post("/v1/rounds/{round_id}/update", tags=["device"], openapi_extra=RAW_BODY, responses=refusals(
        "not_initialized", *BODY_READ_REASONS, "unknown_round", "not_admitted", "duplicate_upload", "round_closed",
        "wrong_protocol", *WIRE_REASONS, "stale_base_version", "bad_metadata", "norm_exceeded"))
    async def upload(round_id: ApiInt, request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Body: wire bytes, kind "delta", header model_version = the task's base_version, metadata
        {"num_examples": int, "metrics": {name: number}}. 200 once durable; a retry of the same bytes gets
        the same answer."""
        limit = models.max_upload_bytes or config.max_upload_bytes or DRAIN_LIMIT
        try:
            # refused before the body is read (or an upload slot taken): an unadmitted device sends nothing
            await run_in_threadpool(manager.upload_round, device_id, round_id)
            body = await read_body(request, limit)
        except Rejection as exc:
            services.metrics.inc("fk_uploads_total", {"result": exc.reason})
            raise
        return await run_in_threadpool(manager.submit_update, device_id, round_id, body)

    @app.post("/v1/rounds/{round_id}/eval", tags=["device"], responses=refusals(
        "not_initialized", "unknown_round", "not_admitted", "duplicate_upload", "round_closed", "bad_report"))
    def eval_report(round_id: ApiInt, body: EvalReport, device_id: str = Depends(device)) -> dict[str, Any]:
        """Recall and loss of the candidate and the baseline on the device's local data."""
        return manager.submit_eval(device_id, round_id, [r.model_dump() for r in body.results])

    @app.get("/v1/rounds/{round_id}", tags=["device"], responses=refusals("unknown_round"))
    def round_info(round_id: ApiInt, _: str = Depends(anyone)) -> dict[str, Any]:
        """State of one round (counts only)."""
        rnd = services.db.get_round(round_id)
        if rnd is None:
            raise Rejection("unknown_round", f"no round {round_id}")
        s = services.reporter.round_summary(rnd)
        return json_safe({k: s[k] for k in ("id", "kind", "state", "base_version", "candidate_version", "deadline",
                                            "result_version", "goal", "admitted", "accepted")})


__all__ = ["add_device_routes"]
