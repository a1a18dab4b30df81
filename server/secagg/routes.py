"""HTTP routes of secure aggregation: the identity registry and the five SecAgg stages.

    POST /v1/devices/identity                        device  {public_key: b64 Ed25519}   set once, never replaced
    GET  /v1/devices/{device_id}/identity            device  {device_id, public_key, registered_at}
    GET  /v1/rounds/{id}/secagg                      device  stage summary
    POST /v1/rounds/{id}/secagg/advertise_keys       device  {c_pk, s_pk, signature}; a low-order or copied key:
                                                             refused and the device is out of the round
    GET  /v1/rounds/{id}/secagg/advertise_keys?wait  device  {ready, participants [{device_id, index, c_pk, s_pk,
                                                              signature, identity_key}], threshold, neighbors, ...}
    POST /v1/rounds/{id}/secagg/share_keys           device  {shares: [{to, ct, sig}], b_commitment}
    GET  /v1/rounds/{id}/secagg/share_keys?wait      device  {ready, u2, shares: [{from, ct, sig}] addressed to the caller}
    POST /v1/rounds/{id}/secagg/masked_input         device  binary FKSA frame (models.secagg_math.encode_masked)
    GET  /v1/rounds/{id}/secagg/masked_input?wait    device  {ready, u3}
    POST /v1/rounds/{id}/secagg/consistency          device  {signature over U3}
    GET  /v1/rounds/{id}/secagg/consistency?wait     device  {ready, u3, signatures}
    POST /v1/rounds/{id}/secagg/unmasking            device  {b_shares: {v: b64}, s_shares: {v: b64},
                                                              pair_seeds?: {v: b64}, complaints?: {v: reason}}
    GET  /v1/rounds/{id}/secagg/unmasking?wait       device  {ready, stage, round_state, result_version}
    POST /v1/rounds/{id}/secagg/abort                device  {reason}: the device left the round (dropouts.py);
                                                             the round fails at once if its threshold is out of reach
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.contract import BODY_READ_REASONS, FRAME_REASONS, ApiInt, refusals
from server.db import Db
from server.errors import Rejection
from server.http.auth_deps import AuthDeps
from server.http.helpers import B64, BINARY_BODY, json_body, json_object, json_safe, read_body
from server.secagg.protocol import GET_READY_AFTER, MAX_ABORT_REASON, MAX_WAIT_S
from server.secagg.service import SecAggService

_POST_BODIES = {
    "advertise_keys": json_body({"c_pk": B64, "s_pk": B64, "signature": B64}, ("c_pk", "s_pk", "signature")),
    "share_keys": json_body({"shares": {"type": "array", "items": {
        "type": "object", "properties": {"to": {"type": "string"}, "ct": B64, "sig": {
            **B64, "description": "the sender's Ed25519 signature (models.secagg_math.share_message)"}},
        "required": ["to", "ct", "sig"]}},
        "b_commitment": {"type": "string", "description": "SHA-256 hex"}}, ("shares", "b_commitment")),
    "consistency": json_body({"signature": B64}, ("signature",)),
    "unmasking": json_body({"b_shares": {"type": "object", "additionalProperties": B64},
                            "s_shares": {"type": "object", "additionalProperties": B64},
                            "pair_seeds": {"type": "object", "additionalProperties": B64, "description":
                                           "for a device whose share this device never got (a dropped one, "
                                           "or a survivor whose own signed share failed): the pairwise mask "
                                           "seed it used with it"},
                            "complaints": {"type": "object", "additionalProperties": {"type": "string"},
                                           "description": "device -> why this device holds no valid share "
                                                          "of it (every share left out is listed)"}},
                           ("b_shares", "s_shares")),
    "abort": json_body({"reason": {"type": "string", "minLength": 1, "maxLength": MAX_ABORT_REASON,
                                   "description": "why the device left (machine-readable, e.g. timeout, bad_share)"}}),
}
# what every SecAgg stage message can be refused with (SecAggService.round, require_stage, the
# duplicate check, the body checks); advertise and consistency also verify a signature
_STAGE_REASONS = ("unknown_round", "not_admitted", "round_closed", "duplicate_upload", "bad_request")
_POST_REASONS = {"advertise_keys": (*_STAGE_REASONS, "no_identity", "bad_signature", "secagg_bad_key",
                                    "secagg_duplicate_key"),
                 "share_keys": (*_STAGE_REASONS, "no_identity", "bad_signature"),
                 "consistency": (*_STAGE_REASONS, "no_identity", "bad_signature"),
                 "unmasking": _STAGE_REASONS,
                 "abort": ("unknown_round", "not_admitted", "round_closed", "bad_request")}
_VIEW_REASONS = ("unknown_round", "not_admitted", "round_closed")  # SecAggService *_view


def ready_check(sa: SecAggService, db: Db, stage_name: str) -> Callable[[int], bool]:
    """Whether the view `stage_name` can answer (its stage closed, or the round is over)."""
    after = GET_READY_AFTER[stage_name]

    def round_over(round_id: int) -> bool:
        rnd = db.get_round(round_id)
        return rnd is None or rnd.is_over

    def ready(round_id: int) -> bool:
        st = sa.state(round_id)
        if st is None or st.stage == "failed":
            return True
        if stage_name == "unmasking":
            return st.stage == "done" or round_over(round_id)
        return st.ready_after(after) or round_over(round_id)
    return ready


def add_secagg_routes(app: FastAPI, sa: SecAggService, db: Db, deps: AuthDeps) -> None:
    device = deps.device

    # ------------------------------------------------------------------ identity registry
    @app.post("/v1/devices/identity", tags=["privacy"], openapi_extra=json_body({"public_key": B64}, ("public_key",)),
              responses=refusals("bad_request", "identity_exists"))
    async def identity_register(request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """Register this device's Ed25519 identity key (once; it can never be replaced)."""
        body = await json_object(request)
        return await run_in_threadpool(sa.identities.register, device_id, str(body.get("public_key", "")))

    @app.get("/v1/devices/{device_id}/identity", tags=["privacy"], responses=refusals("unknown_identity"))
    def identity_get(device_id: str, _: str = Depends(device)) -> dict[str, Any]:
        return sa.identities.get(device_id)

    # ------------------------------------------------------------------ the stages
    @app.get("/v1/rounds/{round_id}/secagg", tags=["privacy"], responses=refusals("unknown_round"))
    def secagg_state(round_id: ApiInt, _: str = Depends(device)) -> dict[str, Any]:
        rnd = db.get_round(round_id)
        if rnd is None or rnd.protocol != "secagg":
            raise Rejection("unknown_round", f"no secure-aggregation round {round_id}")
        summary = sa.summary(round_id) or {"stage": "advertise"}
        # who was caught cheating is for the admin's round view, not for every device that asks
        return json_safe({k: v for k, v in summary.items() if k != "offenders"})

    posts = {"advertise_keys": sa.advertise, "share_keys": sa.share, "consistency": sa.consistency,
             "unmasking": sa.unmasking}
    # leaving is not a stage: no view to wait for, and it is answered whatever the stage (or refused
    # round_closed once the round is over)

    @app.post("/v1/rounds/{round_id}/secagg/abort", tags=["privacy"], name="secagg_abort",
              openapi_extra=_POST_BODIES["abort"], responses=refusals(*_POST_REASONS["abort"]))
    async def secagg_abort(round_id: ApiInt, request: Request, device_id: str = Depends(device)) -> dict[str, Any]:
        """The device leaves the round (a local error, a failed check, it stopped): its later messages are
        refused, and the round is abandoned at once (secagg_threshold_unreachable) when the devices that
        can still answer cannot reach the threshold, or the stage closes at once when nobody else can answer."""
        body = await json_object(request)
        return await run_in_threadpool(sa.drops.record, device_id, round_id, body)
    views = {"advertise_keys": sa.keys_view, "share_keys": sa.shares_view, "masked_input": sa.survivors_view,
             "consistency": sa.signatures_view, "unmasking": sa.result_view}

    async def with_next(answer: dict[str, Any], name: str, round_id: int, device_id: str, wait: float) -> Any:
        """With ?wait=S, an accepted message's answer also carries the stage view the device asks for
        next ("next"), once it is ready (long-poll, at most S seconds): one request per stage instead of
        a POST and a GET. Without it, or if the view is not ready in time, the device GETs the view."""
        if wait <= 0:
            return answer
        ready = ready_check(sa, db, name)
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

    def make_post(name: str, fn: Callable[[str, int, dict[str, Any]], dict[str, Any]]):
        async def post(round_id: ApiInt, request: Request, wait: float = Query(0.0, ge=0.0, le=60.0),
                       device_id: str = Depends(device)) -> Any:
            body = await json_object(request)
            answer = await run_in_threadpool(fn, device_id, round_id, body)
            return await with_next(answer, name, round_id, device_id, wait)
        return post

    def make_get(stage_name: str, fn: Callable[[str, int], dict[str, Any]]):
        ready = ready_check(sa, db, stage_name)

        async def get(round_id: ApiInt, wait: float = Query(0.0, ge=0.0, le=60.0),
                      device_id: str = Depends(device)) -> dict[str, Any]:
            if wait > 0:
                await sa.waiters.wait(round_id, lambda: ready(round_id), min(wait, MAX_WAIT_S))
            # plain JSON: views hold long lists of plain strings and ints, which FastAPI's generic
            # encoder would walk value by value for every one of the cohort's requests
            return JSONResponse(await run_in_threadpool(fn, device_id, round_id))
        return get

    for name, fn in posts.items():
        app.post(f"/v1/rounds/{{round_id}}/secagg/{name}", tags=["privacy"], name=f"secagg_{name}",
                 openapi_extra=_POST_BODIES[name], responses=refusals(*_POST_REASONS[name]))(make_post(name, fn))
    for name, fn in views.items():
        app.get(f"/v1/rounds/{{round_id}}/secagg/{name}", tags=["privacy"], name=f"secagg_{name}_view",
                responses=refusals(*_VIEW_REASONS))(make_get(name, fn))

    @app.post("/v1/rounds/{round_id}/secagg/masked_input", tags=["privacy"], openapi_extra=BINARY_BODY,
              responses=refusals(*BODY_READ_REASONS, "unknown_round", "not_admitted", "round_closed",
                                 "duplicate_upload", *FRAME_REASONS, "bad_metadata"))
    async def secagg_masked_input(round_id: ApiInt, request: Request, wait: float = Query(0.0, ge=0.0, le=60.0),
                                  device_id: str = Depends(device)) -> Any:
        """Binary FKSA frame: the device's masked, quantized update (mod 2^bits). With ?wait=S the answer
        also carries the survivor set ("next") once the masked-input stage closed."""
        body = await read_body(request, sa.inputs.max_input_bytes())
        staged = await run_in_threadpool(sa.inputs.stage, device_id, round_id, body)
        del body  # added to the staging sum: the frame's memory is free while the sum is written
        answer = await run_in_threadpool(sa.inputs.commit, staged)
        return await with_next(answer, "masked_input", round_id, device_id, wait)


__all__ = ["add_secagg_routes", "ready_check"]
