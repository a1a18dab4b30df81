"""Rejections: every refused request is a 4xx with a stable machine-readable reason.

The body is always JSON {"error": reason, "detail": "human sentence"} (server/contract.py ErrorBody;
the OpenAPI document lists each route's reasons per status). A rejection changes nothing on the server
(no row, no file, no aggregate).
"""
from __future__ import annotations

# reason -> HTTP status. Devices branch on the reason, never on the detail text.
REASONS: dict[str, int] = {
    # authentication
    "unauthorized": 401,          # missing, malformed or unknown bearer token
    "forbidden": 403,             # a valid device token on an admin route
    "registration_refused": 403,  # wrong or missing registration key
    "rate_limited": 429,          # too many registrations from this address (Retry-After says when to retry)
    "device_cap_reached": 403,    # the deployment has its maximum of registered devices (--max-devices)
    "banned": 403,                # an admin banned this device: its token is refused for good
    "unknown_device": 404,        # admin: no device with this id
    # request shape
    "bad_request": 422,           # JSON body failed validation
    "not_found": 404,             # unknown route
    "method_not_allowed": 405,
    "unknown_round": 404,
    "unknown_version": 404,
    "not_initialized": 503,       # the server has no model yet
    # uploads
    "not_admitted": 403,          # the device was not admitted to this round
    "round_closed": 409,          # round no longer open (goal reached, deadline passed, abandoned)
    "stale_base_version": 409,    # delta computed from another model version than the round's base
    "duplicate_upload": 409,      # a different payload was already accepted from this device in this round
    "config_mismatch": 409,       # blob made for another model config
    "too_large": 413,             # request body over its route's limit (server/http/limits.py)
    "read_timeout": 408,          # the request body stalled (no byte for a while, or too slow)
    "too_many_concurrent": 429,   # this device already has its maximum of uploads / long-polls in flight
    "client_disconnected": 400,   # the body stopped before its Content-Length (nobody reads this answer)
    "truncated": 400,
    "bad_magic": 400,
    "unsupported_format_version": 400,
    "corrupt_header": 400,
    "checksum_mismatch": 400,
    "shape_mismatch": 400,
    "non_finite": 400,
    "unsupported_dtype": 400,     # not a wire dtype, or not one this deployment accepts
    "wrong_kind": 400,            # weights where a delta was expected or vice versa
    "norm_exceeded": 400,         # L2 norm above the round's clip bound plus the noise tolerance
    "bad_metadata": 400,          # num_examples / metrics missing or invalid
    "bad_report": 400,            # evaluation report for the wrong models or with invalid values
    # admin
    "already_initialized": 409,
    "dp_too_noisy": 422,          # this model under the server's DP settings: round noise beyond --max-noise-to-clip
    "no_candidate": 409,
    "already_global": 409,        # rollback target is the current global model
    "not_a_global_version": 409,  # rollback target was never a global model
    "wire_error": 400,
    # privacy layer (server/secagg/, server/paillier/, server/telemetry/)
    "wrong_protocol": 409,        # a plain upload to a secure-aggregation round (or the reverse)
    "bad_signature": 400,         # advertised keys / consistency signature not by the device's identity key
    "no_identity": 409,           # the device has no registered identity key
    "secagg_bad_key": 400,        # advertised X25519 key of small order or non-canonical: device out of the round
    "secagg_duplicate_key": 409,  # advertised a key another device of the round advertised: device out of the round
    "identity_exists": 409,       # a different identity key is already registered (never replaced)
    "unknown_identity": 404,
    "coins_mismatch": 409,        # randomized response with other coin biases than the server's
    "already_reported": 409,      # this question was already answered in this period
    "keyholder_unavailable": 503,  # the key holder cannot be reached: the server cannot serve this now
    "not_configured": 404,        # this deployment has no such service (e.g. no Paillier key holder)
}


class Rejection(Exception):
    """Raised anywhere below the HTTP layer; the app (server/http/) turns it into the JSON 4xx answer."""

    def __init__(self, reason: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail or reason
        self.status = status if status is not None else REASONS.get(reason, 400)

    def body(self) -> dict[str, str]:
        return {"error": self.reason, "detail": self.detail}


class SecureAggregationFailed(Exception):
    """Raised by a privacy protocol's result: the round must be abandoned, not retried."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
