"""The privacy layer of the server: secure aggregation (SecAgg, server/secagg.py), Paillier rounds
(server/paillier_agg.py with the separate key holder server/keyholder.py) and randomized-response
telemetry (server/telemetry.py), plugged into the round manager and the HTTP app.

RoundManager asks this object, for a training round, which protocol it runs, what the train task
should say under "secure_aggregation", whether check-ins may still join, who handles its deadlines,
and (through RoundContext.secure_sum) for the protected sum when the round aggregates.

Routes added to the app (auth: device = device bearer token, admin = admin token):

    POST /v1/devices/identity                        device  {public_key: b64 Ed25519}   set once, never replaced
    GET  /v1/devices/{device_id}/identity            device  {device_id, public_key, registered_at}
    GET  /v1/rounds/{id}/secagg                      device  stage summary
    POST /v1/rounds/{id}/secagg/advertise_keys       device  {c_pk, s_pk, signature}
    GET  /v1/rounds/{id}/secagg/advertise_keys?wait  device  {ready, participants [{device_id, index, c_pk, s_pk,
                                                              signature, identity_key}], threshold, neighbors, ...}
    POST /v1/rounds/{id}/secagg/share_keys           device  {shares: [{to, ct}], b_commitment}
    GET  /v1/rounds/{id}/secagg/share_keys?wait      device  {ready, u2, shares: [{from, ct}] addressed to the caller}
    POST /v1/rounds/{id}/secagg/masked_input         device  binary FKSA frame (models.secagg_math.encode_masked)
    GET  /v1/rounds/{id}/secagg/masked_input?wait    device  {ready, u3}
    POST /v1/rounds/{id}/secagg/consistency          device  {signature over U3}
    GET  /v1/rounds/{id}/secagg/consistency?wait     device  {ready, u3, signatures}
    POST /v1/rounds/{id}/secagg/unmasking            device  {b_shares: {v: b64}, s_shares: {v: b64}}
    GET  /v1/rounds/{id}/secagg/unmasking?wait       device  {ready, stage, round_state, result_version}
    GET  /v1/paillier/public_key                     device  the key holder's signed public key
    POST /v1/rounds/{id}/paillier/input              device  binary FKPL frame (models.paillier_pack.encode_input)
    GET  /v1/telemetry/config                        device  RR questions, coins, local epsilon
    POST /v1/telemetry/rr                            device  {coins, answers: {question: bool}}
    GET  /v1/admin/telemetry                         admin   de-biased rates, CIs, local epsilon
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.contract import BODY_READ_REASONS, FRAME_REASONS, ApiInt, refusals
from server.errors import Rejection
from server.paillier_agg import PaillierCoordinator, SecureAggregationFailed
from server.secagg import GET_READY_AFTER, MAX_WAIT_S, SecAggCoordinator
from server.telemetry import Telemetry

PROTOCOLS = ("none", "secagg", "paillier")


def protocol_of(rnd: dict[str, Any] | None) -> str:
    if rnd is None or rnd.get("kind") != "train":
        return "none"
    return rnd["params"].get("secure_aggregation", "none") or "none"


class PrivacyServices:
    def __init__(self, manager) -> None:
        self.m = manager
        self.secagg = SecAggCoordinator(manager)
        self.paillier = PaillierCoordinator(manager)
        self.telemetry = Telemetry(manager.db, manager.config)

    def task_params(self, rnd: dict[str, Any]) -> dict[str, Any] | None:
        proto = protocol_of(rnd)
        if proto == "secagg":
            return self.secagg.task_params(rnd)
        if proto == "paillier":
            return self.paillier.task_params(rnd)
        return None

    def admission_open(self, rnd: dict[str, Any]) -> bool:
        return self.secagg.admission_open(rnd) if protocol_of(rnd) == "secagg" else True

    def may_reanswer(self, rnd: dict[str, Any], device_id: str) -> bool:
        """Whether an admitted device checking in again gets its task again (SecAgg: only before it
        advertised keys; a device that lost its round keys cannot rejoin)."""
        if protocol_of(rnd) != "secagg":
            return True
        if not self.secagg.admission_open(rnd):
            return False
        return self.m.db.one("SELECT 1 AS x FROM secagg_keys WHERE round_id = ? AND device_id = ?",
                             (rnd["id"], device_id)) is None

    def manages_deadline(self, rnd: dict[str, Any]) -> bool:
        return protocol_of(rnd) == "secagg"

    def plain_uploads_allowed(self, rnd: dict[str, Any]) -> bool:
        return protocol_of(rnd) == "none"

    def secure_sum(self, rid: int) -> np.ndarray:
        rnd = self.m.db.get_round(rid)
        proto = protocol_of(rnd)
        if proto == "secagg":
            return self.secagg.result_sum(rid)
        if proto == "paillier":
            return self.paillier.result_sum(rid)
        raise RuntimeError(f"round {rid} is not a secure-aggregation round")

    def summary(self, rnd: dict[str, Any]) -> dict[str, Any] | None:
        proto = protocol_of(rnd)
        if proto == "secagg":
            return self.secagg.summary(rnd["id"])
        if proto == "paillier":
            return self.paillier.summary(rnd["id"])
        return None

    def tick(self, now: float) -> None:
        self.secagg.tick(now)
        self.paillier.tick(now)

    def recover(self) -> None:
        self.secagg.recover()
        self.paillier.recover()


def _json_body(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """openapi_extra declaring a JSON object body. The handlers parse the body themselves (a cohort's
    many small messages skip pydantic), so this only documents it: their own checks answer 422 bad_request."""
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_B64 = {"type": "string", "description": "base64"}
_BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_POST_BODIES = {
    "advertise_keys": _json_body({"c_pk": _B64, "s_pk": _B64, "signature": _B64}, ("c_pk", "s_pk", "signature")),
    "share_keys": _json_body({"shares": {"type": "array", "items": {
        "type": "object", "properties": {"to": {"type": "string"}, "ct": _B64}, "required": ["to", "ct"]}},
        "b_commitment": {"type": "string", "description": "SHA-256 hex"}}, ("shares", "b_commitment")),
    "consistency": _json_body({"signature": _B64}, ("signature",)),
    "unmasking": _json_body({"b_shares": {"type": "object", "additionalProperties": _B64},
                             "s_shares": {"type": "object", "additionalProperties": _B64}},
                            ("b_shares", "s_shares")),
}
# what every SecAgg stage message can be refused with (SecAggCoordinator._round, _require_stage, the
# duplicate check, the body checks); advertise and consistency also verify a signature
_STAGE_REASONS = ("unknown_round", "not_admitted", "round_closed", "duplicate_upload", "bad_request")
_POST_REASONS = {"advertise_keys": (*_STAGE_REASONS, "no_identity", "bad_signature"),
                 "share_keys": _STAGE_REASONS,
                 "consistency": (*_STAGE_REASONS, "no_identity", "bad_signature"),
                 "unmasking": _STAGE_REASONS}
_VIEW_REASONS = ("unknown_round", "not_admitted", "round_closed")  # SecAggCoordinator *_view


def add_routes(app, manager, device: Callable[..., Any], admin: Callable[..., Any]) -> None:
    """`device` / `admin`: the app's auth dependencies (server/app.py), shared by every route."""
    from server.app import _json_safe, _read_body

    privacy: PrivacyServices = manager.privacy
    sa = privacy.secagg

    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise Rejection("bad_request", "body must be JSON", status=422) from None
        if not isinstance(body, dict):
            raise Rejection("bad_request", "body must be a JSON object", status=422)
        return body

    # ------------------------------------------------------------------ identity registry
    @app.post("/v1/devices/identity", tags=["privacy"], openapi_extra=_json_body({"public_key": _B64}, ("public_key",)),
              responses=refusals("bad_request", "identity_exists"))
    async def identity_register(request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Register this device's Ed25519 identity key (once; it can never be replaced)."""
        body = await _json(request)
        return await run_in_threadpool(sa.register_identity, device_id, str(body.get("public_key", "")))

    @app.get("/v1/devices/{device_id}/identity", tags=["privacy"], responses=refusals("unknown_identity"))
    def identity_get(device_id: str, _: str = Depends(device)) -> dict[str, Any]:
        return sa.identity(device_id)

    # ------------------------------------------------------------------ secure aggregation
    @app.get("/v1/rounds/{round_id}/secagg", tags=["privacy"], responses=refusals("unknown_round"))
    def secagg_state(round_id: ApiInt, _: str = Depends(device)) -> dict[str, Any]:
        rnd = manager.db.get_round(round_id)
        if protocol_of(rnd) != "secagg":
            raise Rejection("unknown_round", f"no secure-aggregation round {round_id}")
        return _json_safe(sa.summary(round_id) or {"stage": "advertise"})

    posts = {"advertise_keys": sa.advertise, "share_keys": sa.share, "consistency": sa.consistency,
             "unmasking": sa.unmasking}
    views = {"advertise_keys": sa.keys_view, "share_keys": sa.shares_view, "masked_input": sa.survivors_view,
             "consistency": sa.signatures_view, "unmasking": sa.result_view}

    async def _with_next(answer: dict[str, Any], name: str, round_id: int, device_id: str, wait: float) -> Any:
        """With ?wait=S, an accepted message's answer also carries the stage view the device asks for
        next ("next"), once it is ready (long-poll, at most S seconds): one request per stage instead of
        a POST and a GET. Without it, or if the view is not ready in time, the device GETs the view."""
        if wait <= 0:
            return answer
        ready = _ready_check(name)
        if await sa.waiters.wait(round_id, lambda: ready(round_id), min(wait, MAX_WAIT_S)):
            try:
                # inline, not in a worker thread: a closed stage's view reads only memory (the round's
                # cached rows and the parts its close built), and a thread hop per request costs more
                nxt = views[name](device_id, round_id)
            except Rejection:  # e.g. the round failed meanwhile: the device learns it from the view's GET
                nxt = None
            if nxt is not None and nxt.get("ready"):
                return JSONResponse({**answer, "next": nxt})
        return answer

    def _make_post(name: str, fn):
        async def post(round_id: ApiInt, request: Request, wait: float = Query(0.0, ge=0.0, le=60.0),
                       device_id: str = Depends(device)) -> Any:
            body = await _json(request)
            answer = await run_in_threadpool(fn, device_id, round_id, body)
            return await _with_next(answer, name, round_id, device_id, wait)
        return post

    def _ready_check(stage_name: str) -> Callable[[int], bool]:
        """Whether the view `stage_name` can answer (its stage closed, or the round is over)."""
        after = GET_READY_AFTER[stage_name]

        def ready(round_id: int) -> bool:
            s = sa.stage(round_id)
            if s is None or s == "failed":
                return True
            if stage_name == "unmasking":
                return s == "done" or _round_over(round_id)
            from server.secagg import STAGES

            return STAGES.index(s) > STAGES.index(after) or _round_over(round_id)
        return ready

    def _make_get(stage_name: str, fn):
        ready = _ready_check(stage_name)

        async def get(round_id: ApiInt, wait: float = Query(0.0, ge=0.0, le=60.0),
                      device_id: str = Depends(device)) -> dict[str, Any]:
            if wait > 0:
                await sa.waiters.wait(round_id, lambda: ready(round_id), min(wait, MAX_WAIT_S))
            # plain JSON: views hold long lists of plain strings and ints, which FastAPI's generic
            # encoder would walk value by value for every one of the cohort's requests
            return JSONResponse(await run_in_threadpool(fn, device_id, round_id))
        return get

    def _round_over(round_id: int) -> bool:
        rnd = manager.db.get_round(round_id)
        return rnd is None or rnd["state"] in ("closed", "abandoned")

    for name, fn in posts.items():
        app.post(f"/v1/rounds/{{round_id}}/secagg/{name}", tags=["privacy"], name=f"secagg_{name}",
                 openapi_extra=_POST_BODIES[name], responses=refusals(*_POST_REASONS[name]))(_make_post(name, fn))
    for name, fn in views.items():
        app.get(f"/v1/rounds/{{round_id}}/secagg/{name}", tags=["privacy"], name=f"secagg_{name}_view",
                responses=refusals(*_VIEW_REASONS))(_make_get(name, fn))

    @app.post("/v1/rounds/{round_id}/secagg/masked_input", tags=["privacy"], openapi_extra=_BINARY_BODY,
              responses=refusals(*BODY_READ_REASONS, "unknown_round", "not_admitted", "round_closed",
                                 "duplicate_upload", *FRAME_REASONS, "bad_metadata"))
    async def secagg_masked_input(round_id: ApiInt, request: Request, wait: float = Query(0.0, ge=0.0, le=60.0),
                                  device_id: str = Depends(device)) -> Any:
        """Binary FKSA frame: the device's masked, quantized update (mod 2^bits). With ?wait=S the answer
        also carries the survivor set ("next") once the masked-input stage closed."""
        body = await _read_body(request, sa.max_input_bytes())
        staged = await run_in_threadpool(sa.stage_masked, device_id, round_id, body)
        del body  # added to the staging sum: the frame's memory is free while the sum is written
        answer = await run_in_threadpool(sa.commit_masked, staged)
        return await _with_next(answer, "masked_input", round_id, device_id, wait)

    # ------------------------------------------------------------------ Paillier
    @app.get("/v1/paillier/public_key", tags=["privacy"], responses=refusals("not_configured", "keyholder_unavailable"))
    def paillier_key(_: str = Depends(device)) -> dict[str, Any]:
        return privacy.paillier.public_key_info()

    @app.post("/v1/rounds/{round_id}/paillier/input", tags=["privacy"], openapi_extra=_BINARY_BODY,
              responses=refusals(*BODY_READ_REASONS, "unknown_round", "not_admitted", "round_closed",
                                 "duplicate_upload", "not_configured", "keyholder_unavailable", *FRAME_REASONS,
                                 "bad_metadata"))
    async def paillier_input(round_id: ApiInt, request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Binary FKPL frame: the device's packed Paillier ciphertexts."""
        limit = manager.max_upload_bytes * 4 + (1 << 20) if manager.max_upload_bytes else 64 << 20
        body = await _read_body(request, limit)
        return await run_in_threadpool(privacy.paillier.submit, device_id, round_id, body)

    # ------------------------------------------------------------------ randomized response
    @app.get("/v1/telemetry/config", tags=["privacy"])
    def telemetry_config(_: str = Depends(device)) -> dict[str, Any]:
        return privacy.telemetry.public_config()

    @app.post("/v1/telemetry/rr", tags=["privacy"], openapi_extra=_json_body(
        {"coins": {"type": "object", "properties": {"p_first": {"type": "number"}, "p_second": {"type": "number"}}},
         "answers": {"type": "object", "additionalProperties": {"type": "boolean"}}}, ("coins", "answers")),
              responses=refusals("bad_request", "coins_mismatch", "already_reported"))
    async def telemetry_report(request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        body = await _json(request)
        return await run_in_threadpool(privacy.telemetry.report, device_id, body)

    @app.get("/v1/admin/telemetry", tags=["admin"], dependencies=[Depends(admin)])
    def admin_telemetry() -> dict[str, Any]:
        return _json_safe(privacy.telemetry.summary())


__all__ = ["PrivacyServices", "SecureAggregationFailed", "add_routes", "protocol_of", "PROTOCOLS"]
