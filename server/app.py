"""The HTTP app (FastAPI): error handlers, auth, and the routes of each area on top of the services.

JSON for control; the models/ wire format for weights and deltas. Every refusal is a 4xx (503 while
uninitialised) with JSON {"error": reason, "detail": "..."}; reasons are listed in server/errors.py, and
each route's reasons per status in its OpenAPI document (/openapi.json, built by server/contract.py).
See server/__init__.py for the API table. Routes: server/http/ (devices, admin and ops) and the
routes.py of server/secagg/, server/paillier/ and server/telemetry/.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import server as server_package
from server.auth import Auth, ensure_admin_token
from server.config import ServerConfig
from server.contract import finish
from server.errors import REASONS, Rejection
from server.http.admin_routes import add_admin_routes, add_ops_routes
from server.http.auth_deps import auth_dependencies
from server.http.device_routes import add_device_routes
from server.http.limits import BodyLimits, LimitSettings, RouteClass, Rule, route_reasons, rule
from server.paillier.routes import add_paillier_routes
from server.secagg.routes import add_secagg_routes
from server.services import Services, build_services
from server.telemetry.routes import add_telemetry_routes

log = logging.getLogger("server.app")


def create_app(config: ServerConfig, services: Services | None = None) -> FastAPI:
    services = services or build_services(config)
    manager = services.manager
    admin_token = ensure_admin_token(config.admin_token, config.data_path)
    auth = Auth(services.db, admin_token, config.registration_key, config=config)
    deps = auth_dependencies(auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.recover()
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="Federated keyboard aggregation server", version="1",
                  description=f"```\n{server_package.__doc__}\n```", lifespan=lifespan)
    app.state.services = services
    app.state.upload_slots = asyncio.Semaphore(config.upload_slots)
    app.state.auth = auth

    @app.exception_handler(Rejection)
    async def _rejection(request: Request, exc: Rejection) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})  # e.g. rate_limited's Retry-After
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
            services.metrics.inc("fk_auth_failures_total", {"reason": exc.reason})
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

    add_ops_routes(app, services, deps)
    add_device_routes(app, services, deps)
    add_admin_routes(app, services, deps)
    add_secagg_routes(app, services.secagg, services.db, deps)
    add_paillier_routes(app, services.paillier, services.models, deps)
    add_telemetry_routes(app, services.telemetry, deps)
    rules, default, settings = request_limits(config, services)
    finish(app, deps.kinds(), extra=lambda route: route_reasons(
        next(iter(route.methods)), route.path, [q.alias for q in route.dependant.query_params], rules))
    app.add_middleware(BodyLimits, rules=rules, default=default, settings=settings,  # type: ignore[arg-type]
                       preflight=_preflight(auth, services),
                       on_refuse=lambda reason: services.metrics.inc("fk_request_refusals_total", {"reason": reason}))
    return app


def request_limits(config: ServerConfig, services: Services) -> tuple[list[Rule], RouteClass, LimitSettings]:
    """Each route's body limit (server/http/limits.py): model-sized only for the upload routes."""
    models = services.models

    def upload() -> int:  # the largest upload route's own limit (Paillier ciphertexts: 4x the float32 delta)
        return models.max_upload_bytes * 4 + (1 << 20) if models.max_upload_bytes else 64 << 20

    def admin_push() -> int:  # POST /v1/admin/models: wire weights, twice the upload limit (admin_routes.py)
        return max(upload(), (models.max_upload_bytes or 64 << 20) * 2)

    # SecAgg stage messages carry a share / signature per cohort member
    cohort = max(config.max_admitted, config.selection_max_cohort or 0)
    secagg_bytes = config.max_secagg_body_bytes or (64 << 10) + 2048 * cohort
    uploads = RouteClass("upload", upload, upload=True)
    secagg = RouteClass("secagg", lambda: secagg_bytes)
    rules = [rule("POST", "/v1/rounds/{id}/update", uploads),
             rule("POST", "/v1/rounds/{id}/secagg/masked_input", uploads),
             rule("POST", "/v1/rounds/{id}/paillier/input", uploads),
             rule("POST", "/v1/rounds/{id}/secagg/(advertise_keys|share_keys|consistency|unmasking|abort)", secagg),
             rule("POST", "/v1/admin/models", RouteClass("admin_upload", admin_push, admin_first=True)),
             rule("POST", "/v1/admin/init", RouteClass("admin_json", lambda: config.max_admin_body_bytes,
                                                       admin_first=True))]
    default = RouteClass("control", lambda: config.max_control_body_bytes)
    settings = LimitSettings(idle_timeout_s=config.body_idle_timeout_s, min_rate=config.body_min_rate,
                             uploads_per_device=config.max_uploads_per_device,
                             long_polls_per_device=config.max_long_polls_per_device)
    return rules, default, settings


_ROUND_PATH = re.compile(r"^/v1/rounds/(-?\d{1,16})/")


def _preflight(auth: Auth, services: Services):
    """Checks before a body is read or a wait begins: the admin token of the admin routes with large
    bodies; the token and admission of a device that uploads to a round or asks to wait on it (only its
    cohort may). The routes check again (and more: the round's state, the protocol's own stages)."""
    def check(scope: dict[str, Any], route: RouteClass, long_poll: bool) -> None:
        authorization = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if route.admin_first:
            auth.require_admin(authorization)
        if route.upload or long_poll:
            device_id = auth.require_device(authorization)
            match = _ROUND_PATH.match(scope["path"])
            if match:
                round_id = int(match.group(1))
                if services.db.get_round(round_id) is not None and not services.db.is_admitted(round_id, device_id):
                    raise Rejection("not_admitted", f"device was not admitted to round {round_id}; check in first")
    return check


__all__ = ["create_app", "build_services"]
