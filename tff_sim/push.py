"""Hand the final global model to the aggregation server as a candidate (`--push URL --admin-token T`).

The server's admin API (server/app.py):
    GET  /v1/model/info           the deployment's config hash and vocabulary hash
    POST /v1/admin/init           {config, vocab, seed}: initialise an empty server
    POST /v1/admin/models         body = wire-format weights; ?promote=false stages a candidate
All with `Authorization: Bearer <admin token>`. The weights must be of the server's model
config and vocabulary: a mismatch is refused here, before uploading, with the reason.
Adapting to another server is a matter of the ENDPOINTS below and `push_model`'s body.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import httpx
import numpy as np

from models import wire
from models.config import ModelConfig
from models.vocab import Vocabulary

ENDPOINTS = {"info": "/v1/model/info", "init": "/v1/admin/init", "push": "/v1/admin/models"}
WIRE_MEDIA_TYPE = "application/octet-stream"


class PushError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class PushResult:
    version: int | None
    state: str | None
    initialized_server: bool
    response: dict[str, Any]


def _error(resp: httpx.Response) -> tuple[str, str]:
    try:
        body = resp.json()
    except ValueError:
        return f"http_{resp.status_code}", resp.text[:500]
    return str(body.get("error", f"http_{resp.status_code}")), str(body.get("detail", body))[:500]


def push_model(
    url: str,
    admin_token: str,
    config: ModelConfig,
    vocab: Vocabulary,
    weights: Sequence[np.ndarray],
    *,
    model_version: int = 0,
    note: str | None = None,
    metadata: dict[str, Any] | None = None,
    promote: bool = False,
    init_if_empty: bool = True,
    push_path: str = ENDPOINTS["push"],
    client: httpx.Client | None = None,
    timeout: float = 60.0,
) -> PushResult:
    """Upload `weights` as the server's candidate (or new global with promote=True)."""
    own = client is None
    client = client or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
    headers = {"Authorization": f"Bearer {admin_token}"}
    initialized = False
    try:
        info = client.get(ENDPOINTS["info"], headers=headers)
        if info.status_code >= 400:
            reason, detail = _error(info)
            if reason != "not_initialized" or not init_if_empty:
                raise PushError(reason, f"server refused {ENDPOINTS['info']}: {detail}")
            init = client.post(ENDPOINTS["init"], headers=headers,
                               json={"config": config.to_dict(), "vocab": vocab.to_dict(), "seed": 0})
            if init.status_code >= 400:
                raise PushError(*_error(init))
            initialized = True
        else:
            server = info.json()
            if server.get("config_hash") != config.config_hash():
                raise PushError("config_mismatch", f"the server runs model config {server.get('config')} "
                                f"(hash {server.get('config_hash')}), this model is {config.to_dict()} "
                                f"(hash {config.config_hash()})")
            if server.get("vocab_hash") != vocab.content_hash():
                raise PushError("vocab_mismatch", f"the server's vocabulary (hash {server.get('vocab_hash')}) differs "
                                f"from this model's ({vocab.content_hash()}): train with the server's vocabulary")
        blob = wire.encode([np.asarray(w, np.float32) for w in weights], config, kind="weights",
                           model_version=int(model_version), metadata=metadata or {})
        params: dict[str, Any] = {"promote": "true" if promote else "false"}
        if note:
            params["note"] = note
        resp = client.post(push_path, headers={**headers, "Content-Type": WIRE_MEDIA_TYPE}, params=params, content=blob)
        if resp.status_code >= 400:
            reason, detail = _error(resp)
            raise PushError(reason, f"server refused the model: {detail}")
        body = resp.json()
        return PushResult(version=body.get("version"), state=body.get("state"), initialized_server=initialized,
                          response=body)
    except httpx.HTTPError as exc:
        raise PushError("unreachable", f"could not reach {url}: {exc}") from exc
    finally:
        if own:
            client.close()
