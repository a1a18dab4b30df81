"""HTTP routes (FastAPI). JSON for control; the models/ wire format for weights and deltas.

Every refusal is a 4xx (503 while uninitialised) with JSON {"error": reason, "detail": "..."}; reasons
are listed in server/errors.py, and each route's reasons per status in its OpenAPI document (/openapi.json,
built by server/contract.py). See server/__init__.py for the API table.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from models.config import ModelConfig
from models.vocab import Vocabulary, VocabularyError
from server import metrics as prom
from server import status_page
from server.auth import Auth, ensure_admin_token
from server.bootstrap import random_weights
from server.config import ServerConfig
from server.contract import BODY_READ_REASONS, WIRE_REASONS, ApiInt, finish, refusals
from server.db import Db
from server.errors import REASONS, Rejection
from server.metrics import Metrics
from server.rounds import RoundManager
from server.store import Store

log = logging.getLogger("server.app")

WIRE_MEDIA_TYPE = "application/octet-stream"
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this much so the client sees the 413
_RAW_BODY = {"requestBody": {"required": True, "content": {WIRE_MEDIA_TYPE: {"schema": {"type": "string",
                                                                                         "format": "binary"}}}}}
_WIRE_ANSWER = {200: {"description": "models/ wire bytes (kind weights); ETag, X-Model-Version",
                      "content": {WIRE_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
                304: {"description": "Not Modified: If-None-Match matched the ETag"}}


# ---------------------------------------------------------------------- request bodies
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


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: ApiInt
    note: str | None = Field(None, max_length=500)


class InitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    vocab: dict[str, Any]
    seed: int = Field(0, ge=0, le=2 ** 32 - 1)  # numpy's generators take no negative seed


# ---------------------------------------------------------------------- helpers
def build_manager(config: ServerConfig) -> RoundManager:
    config.data_path.mkdir(parents=True, exist_ok=True)
    return RoundManager(config, Db(config.sqlite_path), Store(config.data_path), Metrics())


def _etag(sha: str) -> str:
    return f'"{sha[:32]}"'


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _json_safe(value: Any) -> Any:
    """inf/NaN are not JSON: report them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


LARGE_BODY = 1 << 20  # bodies above this take one of the app's upload slots while they are read


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    slots: asyncio.Semaphore | None = getattr(request.app.state, "upload_slots", None)
    large = slots is not None and not too_large and (declared is None or not declared.isdigit()
                                                     or int(declared) > LARGE_BODY)
    if large:
        await slots.acquire()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_large = True
            if too_large:
                if size > DRAIN_LIMIT:
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise Rejection("client_disconnected", "the client went away before its body arrived", status=400) from None
    finally:
        if large:
            slots.release()
    if too_large:
        raise Rejection("too_large", f"body is {declared or size} bytes, the limit is {limit}")
    return b"".join(chunks)


# ---------------------------------------------------------------------- the app
def create_app(config: ServerConfig, manager: RoundManager | None = None) -> FastAPI:
    manager = manager or build_manager(config)
    admin_token = ensure_admin_token(config.admin_token, config.data_path)
    auth = Auth(manager.db, admin_token, config.registration_key)
    # Two schemes on the same Authorization header, so the document says which token each route takes.
    device_bearer = HTTPBearer(auto_error=False, scheme_name="deviceToken",
                               description="a device's token from POST /v1/devices/register")
    admin_bearer = HTTPBearer(auto_error=False, scheme_name="adminToken",
                              description="the admin token (--admin-token, $FK_ADMIN_TOKEN or <data-dir>/admin_token)")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.recover()
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    import server as server_package

    app = FastAPI(title="Federated keyboard aggregation server", version="1",
                  description=f"```\n{server_package.__doc__}\n```", lifespan=lifespan)
    app.state.manager = manager
    app.state.upload_slots = asyncio.Semaphore(config.upload_slots)
    app.state.auth = auth

    # ------------------------------------------------------------------ errors
    @app.exception_handler(Rejection)
    async def _rejection(request: Request, exc: Rejection) -> JSONResponse:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
            manager.metrics.inc("fk_auth_failures_total", {"reason": exc.reason})
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": "bad_request", "detail": errors[:2000]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown route or method; anything else FastAPI refuses itself (e.g. a JSON body that is not
        # UTF-8: "There was an error parsing the body", a 400) is a malformed request like any invalid
        # JSON, so it gets bad_request's one status (422) as every other validation failure does.
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": reason, "detail": str(exc.detail)}, status_code=REASONS[reason],
                            headers=getattr(exc, "headers", None))

    # ------------------------------------------------------------------ auth dependencies
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

    # /status and /metrics: admin token unless the operator made them public (--public-status)
    status_auth = [] if config.public_status else [Depends(admin)]

    # ------------------------------------------------------------------ public
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "initialized": manager.initialized, "global_version": manager.global_version(),
                "warm": manager.warm.is_set()}

    @app.get("/metrics", tags=["ops"], response_class=Response, dependencies=status_auth,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {prom.CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    def metrics_endpoint() -> Response:
        """Prometheus metrics (counts only). Admin token unless the server runs with --public-status."""
        return Response(_metrics_text(manager), media_type=prom.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/status")

    @app.get("/status", tags=["ops"], response_class=HTMLResponse, dependencies=status_auth)
    def status_html() -> HTMLResponse:
        """The status page (HTML + inline SVG). Admin token unless the server runs with --public-status."""
        page = status_page.render(manager.status(), manager.list_rounds(200), manager.list_versions())
        return HTMLResponse(page)

    # ------------------------------------------------------------------ devices
    @app.post("/v1/devices/register", status_code=201, tags=["device"], responses=refusals("registration_refused"))
    def register(body: RegisterRequest | None = None) -> dict[str, Any]:
        """Register a device: returns its id and bearer token (shown once; the server keeps only a hash)."""
        device_id, token = auth.register(body.registration_key if body else None)
        manager.metrics.inc("fk_registrations_total")
        return {"device_id": device_id, "token": token, "global_version": manager.global_version(),
                "config_hash": manager.model_config.config_hash() if manager.initialized else None}

    @app.get("/v1/model/info", tags=["device"], responses=refusals("not_initialized"))
    def model_info(_: str = Depends(anyone)) -> dict[str, Any]:
        """The deployment's model config and vocabulary hash, the global and candidate versions, and the
        population privacy guarantee of the global model (epsilon, delta, accountant, DP settings)."""
        manager._require_initialized()
        return {"config": manager.model_config.to_dict(), "config_hash": manager.model_config.config_hash(),
                "num_parameters": manager.dim, "vocab_hash": manager.vocab.content_hash(),
                "vocab_size": len(manager.vocab), "global_version": manager.global_version(),
                "candidate_version": manager.candidate_version(), "dp_mode": config.dp_mode,
                "training_enabled": manager.training_enabled(), "upload_dtypes": list(config.upload_dtypes),
                "max_upload_bytes": manager.max_upload_bytes, "secure_aggregation": config.secure_aggregation,
                "privacy": manager.privacy_report()}

    @app.get("/v1/model/vocab", tags=["device"], response_class=JSONResponse,
             responses={**refusals("not_initialized"), 304: _WIRE_ANSWER[304]})
    def model_vocab(if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """The vocabulary as models.vocab JSON (format_version, hash, tokens); ETag = its hash."""
        manager._require_initialized()
        etag = f'"{manager.vocab.content_hash()}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if _etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        return JSONResponse(manager.vocab.to_dict(), headers=headers)

    def _serve_model(version: int, if_none_match: str | None, immutable: bool) -> Response:
        blob, sha = manager.model_blob(version)
        etag = _etag(sha)
        headers = {"ETag": etag, "X-Model-Version": str(version),
                   "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
        if _etag_matches(if_none_match, etag):
            manager.metrics.inc("fk_model_downloads_total", {"status": "304"})
            return Response(status_code=304, headers=headers)
        manager.metrics.inc("fk_model_downloads_total", {"status": "200"})
        return Response(blob, media_type=WIRE_MEDIA_TYPE, headers=headers)

    @app.get("/v1/models/current", tags=["device"], response_class=Response,
             responses={**_WIRE_ANSWER, **refusals("not_initialized")})
    def model_current(if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """The global model as wire bytes (kind weights, header model_version = version). Honors If-None-Match."""
        manager._require_initialized()
        return _serve_model(manager.global_version(), if_none_match, immutable=False)

    @app.get("/v1/models/{version}", tags=["device"], response_class=Response,
             responses={**_WIRE_ANSWER, **refusals("not_initialized", "unknown_version")})
    def model_version(version: ApiInt, if_none_match: str | None = Header(None), _: str = Depends(anyone)) -> Response:
        """Any stored version (global, earlier, or a candidate under evaluation) as wire bytes."""
        manager._require_initialized()
        return _serve_model(version, if_none_match, immutable=True)

    @app.post("/v1/checkin", tags=["device"])
    def checkin(body: CheckinRequest, device_id: str = Depends(device)) -> JSONResponse:
        """Eligibility + model version in; a train/evaluate task or retry-after out."""
        answer = manager.checkin(device_id, body.eligibility.model_dump(), body.model_version)
        headers = {"Retry-After": str(answer["retry_after"])} if answer["action"] == "retry" else {}
        return JSONResponse(answer, headers=headers)

    @app.post("/v1/rounds/{round_id}/update", tags=["device"], openapi_extra=_RAW_BODY, responses=refusals(
        "not_initialized", *BODY_READ_REASONS, "unknown_round", "not_admitted", "duplicate_upload", "round_closed",
        "wrong_protocol", *WIRE_REASONS, "stale_base_version", "bad_metadata", "norm_exceeded"))
    async def upload(round_id: ApiInt, request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Body: wire bytes, kind "delta", header model_version = the task's base_version, metadata
        {"num_examples": int, "metrics": {name: number}}. 200 once durable; a retry of the same bytes gets
        the same answer."""
        limit = manager.max_upload_bytes or config.max_upload_bytes or DRAIN_LIMIT
        try:
            body = await _read_body(request, limit)
        except Rejection as exc:
            manager.metrics.inc("fk_uploads_total", {"result": exc.reason})
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
        rnd = manager.db.get_round(round_id)
        if rnd is None:
            raise Rejection("unknown_round", f"no round {round_id}")
        s = manager.round_summary(rnd)
        return _json_safe({k: s[k] for k in ("id", "kind", "state", "base_version", "candidate_version", "deadline",
                                             "result_version", "goal", "admitted", "accepted")})

    # ------------------------------------------------------------------ admin
    @app.get("/v1/admin/status", tags=["admin"], dependencies=[Depends(admin)])
    def admin_status() -> dict[str, Any]:
        return _json_safe(manager.status())

    @app.get("/v1/admin/config", tags=["admin"], dependencies=[Depends(admin)])
    def admin_config() -> dict[str, Any]:
        return _json_safe(config.public_dict())

    @app.get("/v1/admin/rounds", tags=["admin"], dependencies=[Depends(admin)])
    def admin_rounds(limit: int = Query(100, ge=1, le=10_000),
                     kind: Literal["train", "eval"] | None = None) -> dict[str, Any]:
        return _json_safe({"rounds": manager.list_rounds(limit, kind)})

    @app.get("/v1/admin/rounds/{round_id}", tags=["admin"], dependencies=[Depends(admin)],
             responses=refusals("unknown_round"))
    def admin_round(round_id: ApiInt) -> dict[str, Any]:
        rnd = manager.db.get_round(round_id)
        if rnd is None:
            raise Rejection("unknown_round", f"no round {round_id}")
        return _json_safe(manager.round_summary(rnd))

    @app.get("/v1/admin/versions", tags=["admin"], dependencies=[Depends(admin)])
    def admin_versions() -> dict[str, Any]:
        return _json_safe({"global_version": manager.global_version(),
                           "candidate_version": manager.candidate_version(), "versions": manager.list_versions()})

    @app.get("/v1/admin/privacy", tags=["admin"], dependencies=[Depends(admin)])
    def admin_privacy(accountant: Literal["rdp", "pld"] | None = None) -> dict[str, Any]:
        return _json_safe(manager.privacy_report(accountant))

    @app.post("/v1/admin/training/start", tags=["admin"], dependencies=[Depends(admin)],
              responses=refusals("not_initialized"))
    def training_start() -> dict[str, Any]:
        return _json_safe(manager.set_training(True))

    @app.post("/v1/admin/training/stop", tags=["admin"], dependencies=[Depends(admin)],
              responses=refusals("not_initialized"))
    def training_stop() -> dict[str, Any]:
        return _json_safe(manager.set_training(False))

    @app.post("/v1/admin/models", tags=["admin"], dependencies=[Depends(admin)], openapi_extra=_RAW_BODY,
              responses=refusals("not_initialized", *BODY_READ_REASONS, *WIRE_REASONS))
    async def admin_push(request: Request, promote: bool = False, note: str | None = None) -> dict[str, Any]:
        """Push wire weights (e.g. from tff_sim): staged as the candidate (evaluated on devices), or global with promote=true."""
        limit = (manager.max_upload_bytes or DRAIN_LIMIT) * 2
        body = await _read_body(request, limit)
        return await run_in_threadpool(lambda: manager.push_model(body, promote=promote, note=note))

    @app.post("/v1/admin/candidate/discard", tags=["admin"], dependencies=[Depends(admin)],
              responses=refusals("not_initialized", "no_candidate"))
    def admin_discard() -> dict[str, Any]:
        return manager.discard_candidate()

    @app.post("/v1/admin/rollback", tags=["admin"], dependencies=[Depends(admin)],
              responses=refusals("not_initialized", "unknown_version", "not_a_global_version", "already_global"))
    def admin_rollback(body: RollbackRequest) -> dict[str, Any]:
        return manager.rollback(body.version, body.note)

    @app.post("/v1/admin/init", tags=["admin"], dependencies=[Depends(admin)], status_code=201,
              responses=refusals("already_initialized", "bad_request"))
    def admin_init(body: InitRequest) -> dict[str, Any]:
        """Initialise an empty server: model config + vocabulary JSON, numpy random weights (push real ones next)."""
        try:
            model_config = ModelConfig.from_dict(body.config)
            vocab = Vocabulary.from_dict(body.vocab)
        except (TypeError, ValueError, VocabularyError) as exc:
            raise Rejection("bad_request", f"invalid config or vocabulary: {exc}", status=422) from None
        if len(vocab) != model_config.vocab_size:
            raise Rejection("bad_request", f"vocabulary has {len(vocab)} tokens, config says {model_config.vocab_size}",
                            status=422)
        version = manager.initialize(model_config, vocab, random_weights(model_config, body.seed),
                                     {"init": "admin", "seed": body.seed})
        manager.tick()
        return {"version": version, "config_hash": model_config.config_hash()}

    from server.privacy import add_routes as add_privacy_routes

    add_privacy_routes(app, manager, device, admin)  # secure aggregation, Paillier, randomized response
    finish(app, {device: "device", anyone: "any", admin: "admin"})  # auth + validation refusals, ErrorBody
    return app


def _metrics_text(manager: RoundManager) -> str:
    gauges: list[tuple[str, str, float, dict[str, str] | None]] = []
    status = manager.status()
    devices = status["devices"]
    gauges.append(("fk_devices_registered", "Registered devices.", devices["registered"], None))
    gauges.append(("fk_devices_active_24h", "Devices that took part in the last 24 hours.", devices["active_24h"], None))
    gauges.append(("fk_participations", "Updates accepted, all rounds.", devices["participations"], None))
    gauges.append(("fk_initialized", "1 once the server has a model.", int(status["initialized"]), None))
    gauges.append(("fk_training_enabled", "1 while training rounds run.", int(status["training_enabled"]), None))
    gauges.append(("fk_global_version", "Current global model version.", status["global_version"] or 0, None))
    gauges.append(("fk_candidate_version", "Staged candidate version (0: none).", status["candidate_version"] or 0, None))
    for kind, states in sorted(status["rounds"].items()):
        for state, n in sorted(states.items()):
            gauges.append(("fk_rounds", "Rounds by kind and state.", n, {"kind": kind, "state": state}))
    cur = status["current_round"]
    if cur:
        gauges.append(("fk_current_round_id", "Id of the open training round.", cur["id"], None))
        gauges.append(("fk_current_round_admitted", "Devices admitted to the open training round.", cur["admitted"], None))
        gauges.append(("fk_current_round_accepted", "Updates accepted in the open training round.", cur["accepted"], None))
        gauges.append(("fk_current_round_goal", "Goal of the open training round.", cur["goal"], None))
    privacy = status["privacy"]
    if privacy:
        gauges.append(("fk_epsilon", "Cumulative epsilon of the global model.", privacy["epsilon"], None))
        gauges.append(("fk_dp_delta", "Delta the epsilon is reported at.", privacy["delta"], None))
        gauges.append(("fk_dp_rounds", "Rounds in the privacy ledger.", privacy["dp_rounds"], None))
    return manager.metrics.render(gauges)
