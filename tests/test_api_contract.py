"""The server's OpenAPI document is its contract, checked against a live server.

- The document itself: one error body (ErrorBody) for every error response, each reason declared at the
  status server/errors.py gives it, every route's auth (device token / admin token / none), bounded integers.
- schemathesis fuzzes every operation of a live server against its own /openapi.json, once with a device
  token and once with the admin token, and fails on any 5xx, any response that does not match its declared
  schema or content type, and any undocumented status code.
- /status and /metrics need the admin token unless the server runs with --public-status.
- What the fuzzer found stays fixed (integers beyond SQLite's range, non-UTF-8 JSON, malformed telemetry).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.contract import API_INT_MAX, operations
from server.errors import REASONS
from tests.server_fixtures import ADMIN_TOKEN, ROOT, ServerProcess, server_factory  # noqa: F401  (fixture)

ERROR_REF = "#/components/schemas/ErrorBody"
HUGE = 2 ** 70  # used to reach SQLite as an int and fail there with OverflowError (a 500)


def _doc(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(srv.url + "/openapi.json", timeout=30.0)
    assert r.status_code == 200
    return r.json()


def _declared_refusals(op: dict[str, Any]) -> dict[int, set[str]]:
    """status -> reasons of an operation's error responses (asserting each is an ErrorBody)."""
    out: dict[int, set[str]] = {}
    for status, response in op["responses"].items():
        if int(status) < 400:
            continue
        schema = response["content"]["application/json"]["schema"]
        assert schema["allOf"] == [{"$ref": ERROR_REF}], (status, schema)
        out[int(status)] = set(schema["properties"]["error"]["enum"])
    return out


def _security(op: dict[str, Any]) -> set[str]:
    return {name for requirement in op["security"] for name in requirement}


# ---------------------------------------------------------------------- the document
def test_openapi_document_declares_errors_auth_and_bounds(server_factory):
    srv = server_factory()
    doc = _doc(srv)
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text and "ValidationError" not in doc["components"]["schemas"]
    error_body = doc["components"]["schemas"]["ErrorBody"]
    assert error_body["required"] == ["error", "detail"] and set(error_body["properties"]) == {"error", "detail"}
    assert set(error_body["properties"]["error"]["enum"]) == set(REASONS)
    assert set(doc["components"]["securitySchemes"]) == {"deviceToken", "adminToken"}

    ops = list(operations(doc))
    assert len(ops) >= 40  # the app's and the privacy layer's routes
    for method, path, op in ops:
        where = f"{method.upper()} {path}"
        assert "security" in op, f"{where} declares no auth"
        schemes = _security(op)
        refusals = _declared_refusals(op)
        for status, reasons in refusals.items():
            for reason in reasons:  # each reason at the one status server/errors.py gives it
                assert REASONS[reason] == status, (where, reason, status)
        if path.startswith("/v1/admin/") or path in ("/status", "/metrics"):
            assert op["security"] == [{"adminToken": []}], where
            assert refusals[401] == {"unauthorized"} and refusals[403] >= {"forbidden"}, where
        elif path in ("/healthz", "/v1/devices/register"):
            assert op["security"] == [], where
            assert 401 not in refusals, where
        else:
            assert "deviceToken" in schemes and schemes <= {"deviceToken", "adminToken"}, where
            assert refusals[401] == {"unauthorized"}, where
        for param in op.get("parameters", []):
            schema = param["schema"]
            if schema.get("type") == "integer":  # every integer in a path or query is bounded (ApiInt or tighter)
                assert -API_INT_MAX <= schema["minimum"] <= schema["maximum"] <= API_INT_MAX, (where, param)
        if op.get("parameters") or "requestBody" in op:
            assert "bad_request" in refusals.get(422, set()), where

    # a few routes' own reasons, as their code raises them
    by_key = {(m, p): op for m, p, op in ops}
    upload = _declared_refusals(by_key[("post", "/v1/rounds/{round_id}/update")])
    assert upload[403] == {"not_admitted", "banned"} and upload[413] == {"too_large"}
    assert {"duplicate_upload", "round_closed", "stale_base_version", "config_mismatch"} <= upload[409]
    assert {"norm_exceeded", "checksum_mismatch", "bad_metadata"} <= upload[400]
    assert _declared_refusals(by_key[("post", "/v1/admin/rollback")])[409] == {"already_global", "not_a_global_version"}
    assert _declared_refusals(by_key[("get", "/v1/paillier/public_key")]) == {
        401: {"unauthorized"}, 403: {"banned"}, 404: {"not_configured"}, 503: {"keyholder_unavailable"}}
    assert by_key[("get", "/v1/models/current")]["security"] == [{"deviceToken": []}, {"adminToken": []}]


def _rejection_calls() -> list[tuple[str, int, str, int | None]]:
    """(file, line, reason, explicit status) of every Rejection("literal", ...) in server/."""
    calls = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rejection" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                status = next((kw.value.value for kw in node.keywords
                               if kw.arg == "status" and isinstance(kw.value, ast.Constant)), None)
                calls.append((path.relative_to(ROOT / "server").as_posix(), node.lineno, node.args[0].value, status))
    return calls


def test_every_rejection_reason_is_documented_with_its_status():
    """The document can only be true if each raised reason is in REASONS and answered with REASONS' status."""
    calls = _rejection_calls()
    assert len(calls) > 50
    for name, line, reason, status in calls:
        assert reason in REASONS, f"server/{name}:{line} raises undocumented reason {reason!r}"
        assert status is None or status == REASONS[reason], f"server/{name}:{line}: {reason} as {status}"


# ---------------------------------------------------------------------- what the fuzzer found
def test_out_of_range_integers_are_refused_not_500(server_factory):
    srv = server_factory()
    device = srv.device()
    admin = srv.admin()
    for client, path in [(admin, f"/v1/admin/rounds/{HUGE}"), (admin, f"/v1/admin/rounds/{-HUGE}"),
                         (device.client, f"/v1/rounds/{HUGE}"), (device.client, f"/v1/models/{HUGE}"),
                         (device.client, f"/v1/rounds/{HUGE}/secagg"),
                         (device.client, f"/v1/rounds/{HUGE}/secagg/advertise_keys"),
                         (admin, f"/v1/admin/rounds?limit={HUGE}")]:
        r = client.get(path)
        assert (r.status_code, r.json()["error"]) == (422, "bad_request"), (path, r.text)
    posts = [(device.client, f"/v1/rounds/{HUGE}/update", {"content": b"x"}),
             (device.client, f"/v1/rounds/{HUGE}/eval", {"json": {"results": []}}),
             (device.client, "/v1/checkin", {"json": {"eligibility": {}, "model_version": HUGE}}),
             (device.client, "/v1/rounds/1/eval", {"json": {"results": [
                 {"model_version": HUGE, "num_examples": 1, "recall": 0.5, "loss": 1.0}]}}),
             (admin, "/v1/admin/rollback", {"json": {"version": HUGE}}),
             (admin, "/v1/admin/init", {"json": {"config": {}, "vocab": {}, "seed": -1}})]
    for client, path, kw in posts:
        r = client.post(path, **kw)
        assert (r.status_code, r.json()["error"]) == (422, "bad_request"), (path, r.text)
    # the largest bounded value reaches the database and is simply not there
    r = admin.get(f"/v1/admin/rounds/{API_INT_MAX}")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_round")
    admin.close()
    device.close()


def test_malformed_bodies_are_422_and_unconfigured_services_404(server_factory):
    srv = server_factory()
    device = srv.device()
    # a JSON body that is not UTF-8 was FastAPI's own 400 "error parsing the body": now bad_request's 422
    for path in ("/v1/checkin", "/v1/devices/register", "/v1/rounds/1/eval"):
        r = device.client.post(path, content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (422, "bad_request"), (path, r.text)
    # randomized response: coins that are not an object were an AttributeError (500)
    r = device.client.post("/v1/telemetry/rr", json={"coins": [None, None], "answers": {}})
    assert (r.status_code, r.json()["error"]) == (422, "bad_request"), r.text
    # ... and an integer beyond float range an OverflowError (500)
    r = device.client.post("/v1/telemetry/rr", json={"coins": {"p_first": 10 ** 400, "p_second": 0.5},
                                                     "answers": {"suggestion_accepted": True}})
    assert (r.status_code, r.json()["error"]) == (409, "coins_mismatch"), r.text
    # no Paillier key holder in this deployment: a 4xx refusal, not a 503 "try again later"
    r = device.client.get("/v1/paillier/public_key")
    assert (r.status_code, r.json()["error"]) == (404, "not_configured"), r.text
    device.close()


# ---------------------------------------------------------------------- /status and /metrics
def test_status_and_metrics_need_the_admin_token_by_default(server_factory):
    srv = server_factory()
    device = srv.device()
    anon = srv.anon()
    for path in ("/status", "/metrics"):
        r = anon.get(path)
        assert r.status_code == 401 and r.json() == {
            "error": "unauthorized", "detail": "missing bearer token (Authorization: Bearer <admin token>)"}
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = device.client.get(path)
        assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    with srv.admin() as admin:
        page = admin.get("/status")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        metrics = admin.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert "fk_devices_registered 1" in metrics.text
    anon.close()
    device.close()


def test_public_status_flag_opens_status_and_metrics(server_factory):
    srv = server_factory("--public-status")
    anon = srv.anon()
    page = anon.get("/status")
    assert page.status_code == 200 and "<svg" in page.text
    metrics = anon.get("/metrics")
    assert metrics.status_code == 200 and "fk_initialized 1" in metrics.text
    doc = _doc(srv)
    for path in ("/status", "/metrics"):
        op = doc["paths"][path]["get"]
        assert op["security"] == [] and not _declared_refusals(op), path
    # the admin API stays closed
    assert anon.get("/v1/admin/status").status_code == 401
    anon.close()


# ---------------------------------------------------------------------- schemathesis
FUZZ_CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
MAX_EXAMPLES = 25  # per operation and phase: ~20-30 s per role on 2 cores


def _fuzz(srv: ServerProcess, token: str, workdir: Path) -> tuple[subprocess.CompletedProcess, ET.Element]:
    """schemathesis CLI against the live server's own document; returns the process and its JUnit report."""
    junit = workdir / "schemathesis.xml"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{srv.url}/openapi.json",
           "--header", f"Authorization: Bearer {token}",
           "--checks", FUZZ_CHECKS,
           "--phases", "examples,coverage,fuzzing,stateful",
           "--max-examples", str(MAX_EXAMPLES),
           "--generation-deterministic",  # same cases every run (no seed, no example database)
           "--workers", "1",  # one request at a time: the destructive admin calls run in one order
           # above the secagg long-poll cap (MAX_WAIT_S = 25 s), so a ?wait=60 is an answer, not a timeout
           "--request-timeout", "40",
           "--no-color", "--report", "junit", "--report-junit-path", str(junit)]
    # cwd: schemathesis writes its .hypothesis/.schemathesis folders there, never into the repo
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900, check=False)
    assert junit.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, ET.parse(junit).getroot()


@pytest.mark.slow
@pytest.mark.parametrize("role", ["device", "admin"])
def test_schemathesis_finds_no_contract_violation(server_factory, tmp_path: Path, role: str):
    """Every operation is fuzzed, including the destructive admin ones (init, rollback, training stop,
    model push, candidate discard): they may refuse or act, never answer 5xx or off the document.

    With random ids the device's round and privacy operations mostly end at their auth, validation and
    unknown_round / not_admitted checks; their deeper paths are exercised by the rejection tests
    (tests/test_server_rejections.py, tests/test_privacy_*.py) with real protocol messages."""
    srv = server_factory(name=f"fuzz-{role}")
    if role == "device":
        r = httpx.post(srv.url + "/v1/devices/register", json={"registration_key": srv.registration_key}, timeout=30.0)
        assert r.status_code == 201
        token = r.json()["token"]
    else:
        token = ADMIN_TOKEN
    proc, report = _fuzz(srv, token, tmp_path)
    output = proc.stdout[-12000:] + proc.stderr[-3000:]
    tested = {case.get("name") for case in report.iter("testcase")}
    for method, path, _ in operations(_doc(srv)):
        assert f"{method.upper()} {path}" in tested, f"schemathesis did not test {method.upper()} {path}\n{output}"
    failed = [case.get("name") for case in report.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    assert not failed and proc.returncode == 0, f"contract violations in {failed}:\n{output}"
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
