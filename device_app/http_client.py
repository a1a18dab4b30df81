"""The device's HTTP client for the aggregation server (httpx).

Every call the device makes goes through `ServerAPI`, so this file is the complete list of
what a device ever sends: a registration, check-ins (eligibility booleans and a model
version), model/vocabulary downloads, wire-format deltas with an example count and a few
training metrics, and evaluation reports (recall/loss numbers). Never text or token ids.

`transport` and `on_request` are injection points: tests pass a recording transport
(device_app.testing.RecordingTransport) or a hook to capture every request body, the fleet may
share a connection pool.

httpx (and with it rich, pygments, click) is imported when the first ServerAPI is built, not with
this module: the keyboard imports it at start for the errors and task types below and may never
talk to a server (no server set, or suggestions before the first sync).

Transport security (device_app/transport.py): the base URL, and any absolute URL the server hands
out, must pass the URL policy (plain http:// only to loopback), checked before any connection. The
device token goes only to the configured server's origin (scheme, host and port): a URL on any other
origin is fetched without the Authorization header (transport.same_origin).
Registration sends the server's registration key: `registration_key=`, else $FK_REGISTRATION_KEY.
`ca_file` / `pin_sha256` set how the client ServerAPI builds verifies the server; a `client` or
`transport` passed in carries its own verification (build it with tls_transport.make_transport).

Errors: `Offline` when the server cannot be reached (connection refused, DNS, timeout), and its
`UntrustedServer` when the server's certificate does not match the pin (nothing was sent);
`TransportPolicyError` (a ValueError) for a refused URL; `ServerError` for HTTP errors, with the
server's machine-readable reason from its JSON body {"error": reason, "detail": ...}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from device_app import transport as transport_policy
from models.config import ModelConfig
from models.fedavg import hyperparams_from_task
from models.vocab import Vocabulary

if TYPE_CHECKING:
    import httpx

API = "/v1"
ROUTES = {
    "register": f"{API}/devices/register",
    "checkin": f"{API}/checkin",
    "model_info": f"{API}/model/info",
    "vocab": f"{API}/model/vocab",
    "model_current": f"{API}/models/current",
    "model_version": f"{API}/models/{{version}}",
    "upload": f"{API}/rounds/{{round_id}}/update",
    "eval_report": f"{API}/rounds/{{round_id}}/eval",
    "round": f"{API}/rounds/{{round_id}}",
}
TIMEOUT_S, CONNECT_TIMEOUT_S = 30.0, 5.0  # a request's default timeout; connecting
REGISTRATION_KEY_ENV = "FK_REGISTRATION_KEY"  # the server reads the same variable
RequestHook = Callable[["httpx.Request"], None]


class Offline(Exception):
    """The server could not be reached; the device keeps working offline."""


class UntrustedServer(Offline):
    """The server's TLS certificate is not the pinned one: the device sent nothing and stays offline."""


class ServerError(Exception):
    """The server answered with an HTTP error; `.reason` is its machine-readable tag."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


# Rejections after which retrying the same upload can never succeed: drop it with its round.
FINAL_UPLOAD_REASONS = frozenset(
    {"round_closed", "unknown_round", "not_admitted", "stale_base_version", "duplicate_upload", "config_mismatch"}
)


@dataclass
class Task:
    """A task from a check-in: "train" (federated round) or "evaluate" (candidate evaluation)."""

    type: str
    round_id: int
    raw: dict[str, Any]
    deadline: float | None = None
    config_hash: str | None = None
    # train
    base_version: int | None = None
    model_url: str | None = None
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 0.5
    clip_norm: float = 0.0
    noise_stddev: float = 0.0
    dp_mode: str = "none"
    upload_url: str | None = None
    upload_dtypes: list[str] = field(default_factory=lambda: ["float32"])
    max_upload_bytes: int | None = None
    max_examples: int | None = None
    secure_aggregation: dict[str, Any] | None = None
    # evaluate
    candidate_version: int | None = None
    baseline_version: int | None = None
    model_urls: dict[str, str] = field(default_factory=dict)
    report_url: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Task":
        def opt_int(key: str) -> int | None:
            return None if data.get(key) is None else int(data[key])

        hp = hyperparams_from_task(data)  # the task's epochs / batch_size / learning_rate (models.fedavg.TASK_KEYS)

        return cls(
            type=str(data.get("type", "train")),
            round_id=int(data["round_id"]),
            raw=dict(data),
            deadline=data.get("deadline"),
            config_hash=data.get("config_hash"),
            base_version=opt_int("base_version"),
            model_url=data.get("model_url"),
            epochs=hp.client_epochs,
            batch_size=hp.batch_size,
            learning_rate=hp.client_lr,
            clip_norm=float(data.get("clip_norm") or 0.0),
            noise_stddev=float(data.get("noise_stddev") or 0.0),
            dp_mode=str(data.get("dp_mode", "none")),
            upload_url=data.get("upload_url"),
            upload_dtypes=list(data.get("upload_dtypes") or ["float32"]),
            max_upload_bytes=opt_int("max_upload_bytes"),
            max_examples=opt_int("max_examples"),
            secure_aggregation=data.get("secure_aggregation") or None,
            candidate_version=opt_int("candidate_version"),
            baseline_version=opt_int("baseline_version"),
            model_urls=dict(data.get("model_urls") or {}),
            report_url=data.get("report_url"),
        )


@dataclass
class CheckIn:
    action: str  # "train" | "evaluate" | "retry"
    task: Task | None
    retry_after: float | None
    reason: str | None
    global_version: int | None
    raw: dict[str, Any]


@dataclass
class ModelDownload:
    status: int  # 200 or 304 (not modified)
    data: bytes | None
    etag: str | None
    version: int | None


class ServerAPI:
    """Thin typed wrapper over the server's HTTP API, authenticated with the device token."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        device_id: str | None = None,
        transport: httpx.BaseTransport | None = None,
        on_request: RequestHook | None = None,
        timeout: httpx.Timeout | float | None = None,
        registration_key: str | None = None,
        client: httpx.Client | None = None,
        ca_file: str | None = None,
        pin_sha256: str | None = None,
    ) -> None:
        """timeout None: TIMEOUT_S, CONNECT_TIMEOUT_S to connect."""
        import httpx  # the HTTP stack: on the first ServerAPI, not at the keyboard's start

        from device_app.tls_transport import make_transport

        ca_file, pin_sha256 = transport_policy.check_settings(base_url, ca_file, pin_sha256)
        if (ca_file or pin_sha256) and (client is not None or transport is not None):
            raise ValueError("ca_file / pin_sha256 apply to the client ServerAPI builds; a given client or "
                             "transport verifies by itself (device_app.tls_transport.make_transport)")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.device_id = device_id
        self.registration_key = registration_key or os.environ.get(REGISTRATION_KEY_ENV) or None
        hooks = {"request": [on_request]} if on_request is not None else {}
        self._owns_client = client is None
        if client is None and transport is None:
            transport = make_transport(ca_file=ca_file, pin_sha256=pin_sha256)
        if timeout is None:
            timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = client or httpx.Client(
            base_url=self.base_url, transport=transport, timeout=timeout, event_hooks=hooks,
            headers={"User-Agent": "fk-device/1"},
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # ------------------------------------------------------------------ plumbing

    def _headers(self, extra: dict[str, str] | None = None, url: str | None = None) -> dict[str, str]:
        """The request's headers; the device token only for the configured server's origin (`url`
        None: a path on it)."""
        headers = dict(extra or {})
        if self.token and (url is None or transport_policy.same_origin(self.base_url, url)):
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            transport_policy.check_request_url(self.base_url, path)
            return path
        return f"{self.base_url}{path}"

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        import httpx  # loaded by __init__ already

        from device_app.tls_transport import CertificatePinMismatch

        url = self._url(path)
        absolute = path.startswith(("http://", "https://"))
        headers = self._headers(kwargs.pop("headers", None), url if absolute else None)
        try:
            response = self._client.request(method, url, headers=headers, **kwargs)
        except CertificatePinMismatch as exc:
            raise UntrustedServer(f"{method} {path}: {exc}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise Offline(f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code not in ok:
            raise _error_of(response)
        return response

    # ------------------------------------------------------------------ calls

    def register(self) -> tuple[str, str]:
        body: dict[str, Any] = {}
        if self.registration_key:
            body["registration_key"] = self.registration_key
        data = self._request("POST", ROUTES["register"], json=body, ok=(200, 201)).json()
        self.device_id, self.token = str(data["device_id"]), str(data["token"])
        return self.device_id, self.token

    def check_in(self, eligibility: dict[str, bool], model_version: int | None) -> CheckIn:
        body = {"eligibility": {k: bool(v) for k, v in eligibility.items()}, "model_version": model_version}
        data = self._request("POST", ROUTES["checkin"], json=body).json()
        task = Task.from_json(data["task"]) if data.get("task") else None
        retry = data.get("retry_after")
        return CheckIn(
            action=str(data.get("action") or (task.type if task else "retry")),
            task=task,
            retry_after=None if retry is None else float(retry),
            reason=data.get("reason"),
            global_version=data.get("global_version"),
            raw=data,
        )

    def model_info(self) -> dict[str, Any]:
        return self._request("GET", ROUTES["model_info"]).json()

    def model_config(self, info: dict[str, Any] | None = None) -> ModelConfig:
        info = info if info is not None else self.model_info()
        config = info.get("config", info.get("model_config"))
        return ModelConfig.from_dict(config if isinstance(config, dict) else json.loads(config))

    def vocab(self) -> Vocabulary:
        return Vocabulary.from_dict(self._request("GET", ROUTES["vocab"]).json())

    def download_model(self, version: int | None = None, etag: str | None = None, url: str | None = None) -> ModelDownload:
        """The current global model (or `version`) as wire bytes; 304 when `etag` still matches."""
        path = url or (ROUTES["model_current"] if version is None else ROUTES["model_version"].format(version=version))
        headers = {"If-None-Match": etag} if etag else None
        response = self._request("GET", path, headers=headers, ok=(200, 304))
        version_header = response.headers.get("X-Model-Version")
        return ModelDownload(
            status=response.status_code,
            data=response.content if response.status_code == 200 else None,
            etag=response.headers.get("ETag", etag),
            version=int(version_header) if version_header and version_header.isdigit() else version,
        )

    def upload_update(self, round_id: int, blob: bytes, url: str | None = None) -> dict[str, Any]:
        """Upload a wire-format delta (example count and metrics are in its metadata)."""
        path = url or ROUTES["upload"].format(round_id=round_id)
        return self._request(
            "POST", path, content=blob, headers={"Content-Type": "application/octet-stream"}, ok=(200, 201)
        ).json()

    def report_eval(self, round_id: int, results: list[dict[str, Any]], url: str | None = None) -> dict[str, Any]:
        path = url or ROUTES["eval_report"].format(round_id=round_id)
        return self._request("POST", path, json={"results": results}, ok=(200, 201)).json()

    # ------------------------------------------------------------------ privacy protocols (device_app/secagg.py)

    @staticmethod
    def _options(params: dict[str, Any] | None, timeout: float | None) -> dict[str, Any]:
        import httpx  # loaded by __init__ already

        kw: dict[str, Any] = {"params": params} if params else {}
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
        return kw

    def get_json(self, path: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self._request("GET", path, **self._options(params, timeout)).json()

    def post_json(self, path: str, body: dict[str, Any], params: dict[str, Any] | None = None,
                  timeout: float | None = None) -> dict[str, Any]:
        return self._request("POST", path, json=body, ok=(200, 201), **self._options(params, timeout)).json()

    def post_bytes(self, path: str, blob: bytes, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        return self._request("POST", path, content=blob, headers={"Content-Type": "application/octet-stream"},
                             ok=(200, 201), **self._options(params, timeout)).json()

    def round_info(self, round_id: int) -> dict[str, Any]:
        return self._request("GET", ROUTES["round"].format(round_id=round_id)).json()

    def privacy(self) -> dict[str, Any]:
        """The population privacy guarantee the server reports in the model info: {"epsilon", "delta",
        "dp_mode", "accountant", ...}; {"dp_mode": ...} alone when it reports none."""
        info = self.model_info()
        return {"dp_mode": info.get("dp_mode"), **(info.get("privacy") or {})}


def _error_of(response: httpx.Response) -> ServerError:
    reason, detail = f"http_{response.status_code}", response.text[:500]
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            reason, detail = body["error"], str(body.get("detail", ""))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        pass
    return ServerError(response.status_code, reason, detail)


__all__ = [
    "API",
    "ROUTES",
    "CheckIn",
    "FINAL_UPLOAD_REASONS",
    "ModelDownload",
    "Offline",
    "ServerAPI",
    "ServerError",
    "Task",
    "UntrustedServer",
]
