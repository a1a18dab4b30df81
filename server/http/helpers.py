"""Request and response helpers shared by every route module: bounded body reads, JSON objects,
ETags, JSON-safe floats, and the OpenAPI fragments for raw and JSON bodies."""
from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from server.errors import Rejection
from server.http.limits import content_length

WIRE_MEDIA_TYPE = "application/octet-stream"
DRAIN_LIMIT = 64 << 20  # the upload limit while no model (so no model size) is known
LARGE_BODY = 1 << 20  # bodies above this take one of the app's upload slots while they are read
RAW_BODY = {"requestBody": {"required": True, "content": {WIRE_MEDIA_TYPE: {"schema": {"type": "string",
                                                                                        "format": "binary"}}}}}
WIRE_ANSWER = {200: {"description": "models/ wire bytes (kind weights); ETag, X-Model-Version",
                     "content": {WIRE_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
               304: {"description": "Not Modified: If-None-Match matched the ETag"}}
BINARY_BODY = {"requestBody": {"required": True, "content": {WIRE_MEDIA_TYPE: {
    "schema": {"type": "string", "format": "binary"}}}}}  # a privacy protocol's binary frame
B64 = {"type": "string", "description": "base64"}


def json_body(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """openapi_extra declaring a JSON object body. The handlers parse the body themselves (a cohort's
    many small messages skip pydantic), so this only documents it: their own checks answer 422 bad_request."""
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def etag(sha: str) -> str:
    return f'"{sha[:32]}"'


def etag_matches(header: str | None, tag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == tag:
            return True
    return False


def json_safe(value: Any) -> Any:
    """inf/NaN are not JSON: report them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


async def json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body (422 bad_request otherwise)."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, an int over 4,300 digits, nested too deep
        raise Rejection("bad_request", "body must be JSON", status=422) from None
    if not isinstance(body, dict):
        raise Rejection("bad_request", "body must be a JSON object", status=422)
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 too_large, refused as soon as a declared Content-Length or
    the bytes read pass it: nothing past the limit is read). Large bodies wait for one of the app's upload
    slots before they are read (TCP backpressure holds the rest); server/http/limits.py bounds how long a
    body may take and how many one device reads at once, so slow senders cannot hold the slots."""
    declared = content_length(request.headers.raw)
    if declared is not None and declared > limit:
        raise Rejection("too_large", f"body is {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    slots: asyncio.Semaphore | None = getattr(request.app.state, "upload_slots", None)
    large = slots is not None and (declared is None or declared > LARGE_BODY)
    if large:
        await slots.acquire()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Rejection("too_large", f"body is over {limit} bytes, the limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Rejection("client_disconnected", "the client went away before its body arrived", status=400) from None
    finally:
        if large:
            slots.release()
    return b"".join(chunks)


__all__ = ["B64", "BINARY_BODY", "DRAIN_LIMIT", "LARGE_BODY", "RAW_BODY", "WIRE_ANSWER", "WIRE_MEDIA_TYPE", "etag",
           "etag_matches", "json_body", "json_object", "json_safe", "read_body"]
