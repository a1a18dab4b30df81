"""Admin routes (/v1/admin/...) and the operator's pages: /healthz, /metrics, /status."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from models.config import ModelConfig
from models.vocab import Vocabulary, VocabularyError
from server import metrics as prom
from server import dp_sanity, status_page
from server.bootstrap import random_weights
from server.contract import BODY_READ_REASONS, WIRE_REASONS, ApiInt, refusals
from server.errors import Rejection
from server.http.auth_deps import AuthDeps
from server.http.helpers import DRAIN_LIMIT, RAW_BODY, json_safe, read_body
from server.services import Services
from server.versions import release_view

ReleaseState = Literal["served", "awaiting_evaluation", "held_back", "superseded", "promoted", "discarded"]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: ApiInt
    note: str | None = Field(None, max_length=500)


class DeviceBlockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


DEVICE_ID = Path(pattern=r"^d_[0-9a-f]{1,64}$", max_length=66, description="a device id as registration returns it")


class InitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    vocab: dict[str, Any]
    seed: int = Field(0, ge=0, le=2 ** 32 - 1)  # numpy's generators take no negative seed


class VersionView(BaseModel):
    """One stored version (more fields may follow: extra keys are allowed)."""

    model_config = ConfigDict(extra="allow")
    version: int
    source: str
    parent_version: int | None = None
    was_global: bool
    is_global: bool
    is_candidate: bool
    candidate_state: str | None = None
    release_state: ReleaseState = Field(description="served: the global model; awaiting_evaluation: in its "
                                        "evaluation round; held_back: regressed against the served version "
                                        "(release_reason says how); superseded: served earlier, or replaced before "
                                        "its evaluation; promoted / discarded: pushed candidates")
    release_reason: str | None = Field(None, description='e.g. "held back: recall 0.081 vs served 0.112 on 14 '
                                                         'devices, tolerance 0.005"')


class VersionsAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")
    global_version: int | None
    candidate_version: int | None
    awaiting_evaluation: int | None = Field(description="the trained version awaiting its release evaluation")
    versions: list[VersionView]


class ReleaseStatus(BaseModel):
    """Release gating: versions produced by training rounds are evaluated before they are served."""

    gate: Literal["eval", "off"]
    awaiting_evaluation: int | None
    consecutive_held_back: int
    max_rejected_versions: int = Field(description="training stops after this many held-back versions in a row "
                                                   "(0: never)")
    training_stopped_reason: str | None = Field(description="why training is stopped (None: running, or never "
                                                            "started)")


class StatusAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")
    release: ReleaseStatus


def versions_with_release(services: Services) -> list[dict[str, Any]]:
    """The version listing with each version's release state and reason (server/versions.release_view)."""
    g = services.models.global_version()
    out = []
    for v in services.reporter.list_versions():
        state, reason = release_view(v, g)
        out.append(v | {"release_state": state, "release_reason": reason})
    return out


def status_with_release(services: Services) -> dict[str, Any]:
    return services.reporter.status() | {"release": services.models.release_status()}


def add_ops_routes(app: FastAPI, services: Services, deps: AuthDeps) -> None:
    manager, reporter, models = services.manager, services.reporter, services.models
    # /status and /metrics: admin token unless the operator made them public (--public-status)
    status_auth = [] if services.config.public_status else [Depends(deps.admin)]

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "initialized": models.initialized, "global_version": models.global_version(),
                "warm": manager.warm.is_set(), "role": manager.role}

    @app.get("/metrics", tags=["ops"], response_class=Response, dependencies=status_auth,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {prom.CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    def metrics_endpoint() -> Response:
        """Prometheus metrics (counts only). Admin token unless the server runs with --public-status."""
        return Response(reporter.metrics_text(), media_type=prom.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/status")

    @app.get("/status", tags=["ops"], response_class=HTMLResponse, dependencies=status_auth)
    def status_html() -> HTMLResponse:
        """The status page (HTML + inline SVG). Admin token unless the server runs with --public-status."""
        return HTMLResponse(status_page.render(status_with_release(services), reporter.list_rounds(200),
                                               versions_with_release(services)))


def add_admin_routes(app: FastAPI, services: Services, deps: AuthDeps) -> None:
    manager, reporter, models, ops = services.manager, services.reporter, services.models, services.admin
    admin = [Depends(deps.admin)]

    auth = app.state.auth

    @app.get("/v1/admin/status", tags=["admin"], dependencies=admin, response_model=StatusAnswer)
    def admin_status() -> dict[str, Any]:
        return json_safe(status_with_release(services) | {"registration": auth.registration_status(services.config)})

    @app.get("/v1/admin/config", tags=["admin"], dependencies=admin)
    def admin_config() -> dict[str, Any]:
        return json_safe(services.config.public_dict())

    @app.get("/v1/admin/rounds", tags=["admin"], dependencies=admin)
    def admin_rounds(limit: int = Query(100, ge=1, le=10_000),
                     kind: Literal["train", "eval"] | None = None) -> dict[str, Any]:
        return json_safe({"rounds": reporter.list_rounds(limit, kind)})

    @app.get("/v1/admin/rounds/{round_id}", tags=["admin"], dependencies=admin, responses=refusals("unknown_round"))
    def admin_round(round_id: ApiInt) -> dict[str, Any]:
        rnd = services.db.get_round(round_id)
        if rnd is None:
            raise Rejection("unknown_round", f"no round {round_id}")
        return json_safe(reporter.round_summary(rnd))

    @app.get("/v1/admin/versions", tags=["admin"], dependencies=admin, response_model=VersionsAnswer)
    def admin_versions() -> dict[str, Any]:
        """Every stored version with its release state (served / awaiting_evaluation / held_back + reason / ...)."""
        return json_safe({"global_version": models.global_version(), "candidate_version": models.candidate_version(),
                          "awaiting_evaluation": models.release_pending(), "versions": versions_with_release(services)})

    @app.get("/v1/admin/privacy", tags=["admin"], dependencies=admin)
    def admin_privacy(accountant: Literal["rdp", "pld"] | None = None) -> dict[str, Any]:
        return json_safe(manager.account.report(accountant))

    @app.post("/v1/admin/training/start", tags=["admin"], dependencies=admin, responses=refusals("not_initialized"))
    def training_start() -> dict[str, Any]:
        return json_safe(ops.set_training(True))

    @app.post("/v1/admin/training/stop", tags=["admin"], dependencies=admin, responses=refusals("not_initialized"))
    def training_stop() -> dict[str, Any]:
        return json_safe(ops.set_training(False))

    @app.post("/v1/admin/models", tags=["admin"], dependencies=admin, openapi_extra=RAW_BODY,
              responses=refusals("not_initialized", *BODY_READ_REASONS, *WIRE_REASONS))
    async def admin_push(request: Request, promote: bool = False, note: str | None = None) -> dict[str, Any]:
        """Push wire weights (e.g. from tff_sim): staged as the candidate (evaluated on devices), or global with promote=true."""
        limit = (models.max_upload_bytes or DRAIN_LIMIT) * 2
        body = await read_body(request, limit)
        return await run_in_threadpool(lambda: ops.push_model(body, promote=promote, note=note))

    @app.post("/v1/admin/candidate/discard", tags=["admin"], dependencies=admin,
              responses=refusals("not_initialized", "no_candidate"))
    def admin_discard() -> dict[str, Any]:
        return ops.discard_candidate()

    @app.post("/v1/admin/rollback", tags=["admin"], dependencies=admin,
              responses=refusals("not_initialized", "unknown_version", "not_a_global_version", "already_global"))
    def admin_rollback(body: RollbackRequest) -> dict[str, Any]:
        return ops.rollback(body.version, body.note)

    # ---- devices (issue #18): revoke / ban, effective at the device's next request (docs/security.md)
    @app.get("/v1/admin/devices/{device_id}", tags=["admin"], dependencies=admin, responses=refusals("unknown_device"))
    def admin_device(device_id: str = DEVICE_ID) -> dict[str, Any]:
        """A device's registration time, last check-in and block state (ok / revoked / banned)."""
        return json_safe(auth.device_view(device_id))

    @app.post("/v1/admin/devices/{device_id}/revoke", tags=["admin"], dependencies=admin,
              responses=refusals("unknown_device"))
    def admin_revoke(device_id: str = DEVICE_ID, body: DeviceBlockRequest | None = None) -> dict[str, Any]:
        """Invalidate the device's token (401 unauthorized from its next request on); the device may register
        again, as a new device. A banned device stays banned."""
        return auth.set_block(device_id, "revoked", body.reason if body else None)

    @app.post("/v1/admin/devices/{device_id}/ban", tags=["admin"], dependencies=admin,
              responses=refusals("unknown_device"))
    def admin_ban(device_id: str = DEVICE_ID, body: DeviceBlockRequest | None = None) -> dict[str, Any]:
        """Refuse the device's token for good (403 banned from its next request on, uploads to a round it
        was admitted to included). Registering again needs the registration key: rotate it if it leaked."""
        return auth.set_block(device_id, "banned", body.reason if body else None)

    @app.post("/v1/admin/devices/{device_id}/unban", tags=["admin"], dependencies=admin,
              responses=refusals("unknown_device"))
    def admin_unban(device_id: str = DEVICE_ID) -> dict[str, Any]:
        """Lift a ban: the device is then revoked (its old token stays invalid; it may register again)."""
        return auth.set_block(device_id, None)

    @app.post("/v1/admin/init", tags=["admin"], dependencies=admin, status_code=201,
              responses=refusals("already_initialized", "bad_request", "dp_too_noisy"))
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
        refusal = dp_sanity.startup_refusal(manager.config, model_config.num_parameters())
        if refusal is not None:  # the start-up check, postponed until the model's size is known
            raise Rejection("dp_too_noisy", refusal, status=422)
        version = models.initialize(model_config, vocab, random_weights(model_config, body.seed),
                                    {"init": "admin", "seed": body.seed})
        manager.tick()
        return {"version": version, "config_hash": model_config.config_hash()}


__all__ = ["add_admin_routes", "add_ops_routes"]
