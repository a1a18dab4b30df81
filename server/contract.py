"""The HTTP contract as the OpenAPI document states it: one error body, each route's refusals, its auth.

Every refusal is JSON `ErrorBody` {"error": reason, "detail": "..."} with a reason from server/errors.py.
A route names the reasons its own code can refuse with (`refusals(...)` as its `responses=`); `finish(app)`
then adds what follows from the route's dependencies (the 401/403 of its auth dependency, the 422 of
request validation) and marks the routes without auth as such. Each error response's schema is ErrorBody
with `error` narrowed to the reasons that route can answer with at that status, so the document is what
the server sends; tests/test_api_contract.py fuzzes the live server against it (schemathesis).

Integers in paths, queries and bodies are `ApiInt`: bounded, so that no value can reach SQLite (signed
64-bit) or numpy out of range and become a 500; out of range is the usual 422 bad_request.
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, Iterable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from server.errors import REASONS

# JSON numbers are IEEE doubles for many clients (and FastAPI writes schema bounds as floats): 2^53 - 1 is
# the largest integer every JSON reader keeps exact, and it is well inside SQLite's signed 64-bit INTEGER.
API_INT_MAX = 2 ** 53 - 1
ApiInt = Annotated[int, Field(ge=-API_INT_MAX, le=API_INT_MAX)]

ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"

# What each auth dependency of server/app.py can refuse with.
AUTH_REASONS: dict[str, tuple[str, ...]] = {
    "device": ("unauthorized", "banned"),   # missing or unknown device token (the admin token is no device)
    "any": ("unauthorized", "banned"),      # a device token or the admin token; banned: a banned device's token
    "admin": ("unauthorized", "forbidden"),  # forbidden: a valid device token on an admin route
}

# Reason groups shared by several routes (derived from the code paths named in the comments).
WIRE_REASONS = ("truncated", "bad_magic", "unsupported_format_version", "corrupt_header", "checksum_mismatch",
                "config_mismatch", "shape_mismatch", "non_finite", "unsupported_dtype", "wrong_kind", "too_large",
                "bad_metadata", "wire_error")  # models.wire.WireError subclasses
FRAME_REASONS = ("truncated", "bad_magic", "unsupported_format_version", "corrupt_header", "checksum_mismatch",
                 "wrong_kind", "shape_mismatch", "too_large")  # models.privacy_wire.FrameError reasons
BODY_READ_REASONS = ("too_large", "client_disconnected")  # server.http.helpers.read_body


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API."""
    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="machine-readable reason (server/errors.py); clients branch on it",
                       json_schema_extra={"enum": sorted(REASONS)})
    detail: str = Field(description="a human sentence; never parse it")


def status_of(reason: str) -> int:
    """The HTTP status a reason is answered with (server/errors.py)."""
    if reason not in REASONS:
        raise KeyError(f"unknown rejection reason {reason!r}: add it to server/errors.py REASONS")
    return REASONS[reason]


def refusals(*reasons: str) -> dict[int | str, dict[str, Any]]:
    """A `responses=` dict for a route that can refuse with these reasons, grouped by HTTP status."""
    by_status: dict[int, set[str]] = {}
    for reason in reasons:
        by_status.setdefault(status_of(reason), set()).add(reason)
    return {status: _error_response(sorted(rs)) for status, rs in sorted(by_status.items())}


def _error_response(reasons: list[str]) -> dict[str, Any]:
    return {"description": "Refused: " + ", ".join(reasons),
            "content": {"application/json": {"schema": {
                "allOf": [{"$ref": ERROR_SCHEMA_REF}],
                "properties": {"error": {"enum": reasons}}}}}}


def _declared_reasons(responses: dict[int | str, dict[str, Any]]) -> set[str]:
    """The reasons already declared by `refusals` in a route's responses."""
    out: set[str] = set()
    for response in responses.values():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("allOf") == [{"$ref": ERROR_SCHEMA_REF}]:
            out.update(schema["properties"]["error"]["enum"])
    return out


def _auth_kinds(dependant: Any, auth: dict[Callable[..., Any], str]) -> set[str]:
    """The auth dependencies (by kind) a route's dependency tree uses."""
    kinds: set[str] = set()
    stack = [dependant]
    while stack:
        dep = stack.pop()
        if dep.call in auth:
            kinds.add(auth[dep.call])
        stack.extend(dep.dependencies)
    return kinds


def _has_inputs(dependant: Any) -> bool:
    """Whether FastAPI validates anything of the request for this route (then it can answer 422)."""
    stack = [dependant]
    while stack:
        dep = stack.pop()
        if dep.path_params or dep.query_params or dep.header_params or dep.cookie_params or dep.body_params:
            return True
        stack.extend(dep.dependencies)
    return False


def finish(app: FastAPI, auth: dict[Callable[..., Any], str],
           extra: Callable[[APIRoute], Iterable[str]] | None = None) -> None:
    """Complete every route's declared refusals from its dependencies and publish ErrorBody.

    `auth` maps the app's auth dependency callables to their kind ("device", "any", "admin"). Call once,
    after all routes are added and before the document is first served. `extra(route)`: more reasons the
    route can be refused with outside its own code (the request limits of server/http/limits.py).
    """
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        kinds = _auth_kinds(route.dependant, auth)
        reasons = _declared_reasons(route.responses)
        for kind in kinds:
            reasons.update(AUTH_REASONS[kind])
        if _has_inputs(route.dependant):
            reasons.add("bad_request")
        if extra is not None:
            reasons.update(extra(route))
        route.responses.update(refusals(*reasons))
        route.responses = dict(sorted(route.responses.items(), key=lambda kv: str(kv[0])))
        if not kinds:  # explicit: this route needs no token (OpenAPI's empty security requirement)
            route.openapi_extra = {**(route.openapi_extra or {}), "security": []}

    fastapi_openapi = app.openapi  # FastAPI's own builder (it caches the document in app.openapi_schema)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # error responses reference ErrorBody by $ref (no route lists it as a model, so add it here)
            doc = fastapi_openapi()
            doc.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ErrorBody.model_json_schema()
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def operations(doc: dict[str, Any]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of an OpenAPI document."""
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield method, path, op
