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
from server.paillier.routes import add_paillier_routes
from server.secagg.routes import add_secagg_routes
from server.services import Services, build_services
from server.telemetry.routes import add_telemetry_routes

log = logging.getLogger("server.app")


def create_app(config: ServerConfig, services: Services | None = None) -> FastAPI:
    services = services or build_services(config)
    manager = services.manager
    admin_token = ensure_admin_token(config.admin_token, config.data_path)
    auth = Auth(services.db, admin_token, config.registration_key)
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
        headers = {}
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
    finish(app, deps.kinds())  # auth + validation refusals, ErrorBody
    return app


__all__ = ["create_app", "build_services"]
