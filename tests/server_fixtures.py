"""Shared fixtures for the server tests: a real `python -m server` subprocess on a free loopback port,
a real SQLite file in a temp data dir, and real HTTP clients (httpx).

Use from a test module with `from tests.server_fixtures import *  # noqa: F401,F403` (pytest then
sees the fixtures) or import the helpers by name.
"""
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import httpx
import numpy as np
import pytest

from models import wire
from models.config import ModelConfig, preset
from tests.pg_fixture import server_database_args

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
# Registration needs a key (issue #18). The servers started here get this one (unless a test gives
# --registration-key / --open-registration), and device code started by the tests (ServerAPI, DeviceClient,
# the fleet) picks it up from $FK_REGISTRATION_KEY, as `python -m device_app` does.
REGISTRATION_KEY_ENV = "FK_REGISTRATION_KEY"
os.environ.setdefault(REGISTRATION_KEY_ENV, "test-registration-key")
REGISTRATION_KEY = os.environ[REGISTRATION_KEY_ENV]
ELIGIBLE = {"charging": True, "unmetered": True, "idle": True}
TINY = preset("tiny")


class ServerProcess:
    """One server subprocess; `restart()` keeps the data dir (for crash tests). Runs with --release-gate off
    unless `args` give --release-gate (tests/test_server_gating.py does)."""

    def __init__(self, data_dir: Path, args: Sequence[str], log_path: Path,
                 env: dict[str, str | None] | None = None, name: str | None = None) -> None:
        self.data_dir = data_dir
        self.name = name or data_dir.name  # its port file's name: processes sharing a data dir (--cluster) differ
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env or {})  # the server's environment on top of ours; None removes a variable
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def ca_file(self) -> Path | None:
        """The certificate an https server (--tls-cert / --tls-self-signed) presents; None for http."""
        if "--tls-cert" in self.args:
            return Path(self.args[self.args.index("--tls-cert") + 1])
        if "--tls-self-signed" in self.args:
            return self.data_dir / "tls_cert.pem"
        return None

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's verify for this server: its own certificate as the CA file when it serves https."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    @property
    def registration_key(self) -> str | None:
        """The key this server's devices register with (None: --open-registration)."""
        if "--open-registration" in self.args:
            return None
        if "--registration-key" in self.args:
            return self.args[self.args.index("--registration-key") + 1]
        if REGISTRATION_KEY_ENV in self.env and self.env[REGISTRATION_KEY_ENV] is None:  # generated
            key_file = self.data_dir / "registration_key"
            return key_file.read_text().strip() if key_file.exists() else None
        return self.env.get(REGISTRATION_KEY_ENV) or REGISTRATION_KEY

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        port_file = self.data_dir.parent / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        # Release gating (an evaluation round before a trained version is served) is off unless a test asks for
        # it: the other tests check rounds, privacy and transport, and expect each round's version served at once.
        gate = [] if any(a.startswith("--release-gate") for a in self.args) else ["--release-gate", "off"]
        # Registrations come from one address here: no per-address burst limit unless a test sets one.
        burst = [] if any(a.startswith("--registration-burst") for a in self.args) else ["--registration-burst",
                                                                                          "1000000"]
        # FK_TEST_DATABASE=postgresql: the store on PostgreSQL (tests/pg_fixture.py), unless the test chose one
        database = [] if "--database" in self.args else server_database_args(self.data_dir)
        if "--secure-aggregation" in self.args and \
                self.args[self.args.index("--secure-aggregation") + 1] != "none":  # --cluster refuses it
            database = [a for a in database if a != "--cluster"]
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
               "--data-dir", str(self.data_dir), "--admin-token", ADMIN_TOKEN, "--log-level", "warning", *gate,
               *burst, *database, *self.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("FK_ADMIN_TOKEN", None)
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                try:
                    if httpx.get(self.url + "/healthz", timeout=2.0, verify=self.verify).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def wait_warm(self, timeout: float = 60.0) -> "ServerProcess":
        """Wait until the server's start-up imports are done (/healthz "warm"), e.g. before timing it."""
        deadline = time.monotonic() + timeout
        while not httpx.get(self.url + "/healthz", timeout=5.0, verify=self.verify).json().get("warm"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not warm after {timeout}s")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def db_target(self) -> str | Path:
        """The server's store: its --database URL (given, or FK_TEST_DATABASE's) or its SQLite file."""
        args = self.args if "--database" in self.args else server_database_args(self.data_dir)  # as start() does
        return args[args.index("--database") + 1] if "--database" in args else self.data_dir / "server.sqlite3"

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        """Rows of the server's store, on either engine (SQL in SQLite's spelling, as the server writes it)."""
        from server.db_dialect import open_dialect

        dialect = open_dialect(self.db_target)
        conn = dialect.connect()
        try:
            return [dict(r) for r in conn.execute(dialect.sql(sql), dialect.params(tuple(args))).fetchall()]
        finally:
            conn.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    # ------------------------------------------------------------------ clients
    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60.0,
                            verify=self.verify)

    def anon(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, verify=self.verify)

    def device(self) -> "Device":
        return Device(self)

    def admin_get(self, path: str, **kw: Any) -> Any:
        with self.admin() as c:
            r = c.get(path, **kw)
            r.raise_for_status()
            return r.json()

    def admin_post(self, path: str, **kw: Any) -> httpx.Response:
        with self.admin() as c:
            return c.post(path, **kw)

    def round(self, round_id: int) -> dict[str, Any]:
        return self.admin_get(f"/v1/admin/rounds/{round_id}")

    def wait_round(self, round_id: int, states: Sequence[str] = ("closed", "abandoned"), timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.round(round_id)
            if r["state"] in states:
                return r
            time.sleep(0.05)
        raise AssertionError(f"round {round_id} did not reach {states}: {self.round(round_id)}")

    def model(self, version: int | str = "current") -> tuple[int, list[np.ndarray]]:
        with self.admin() as c:
            r = c.get(f"/v1/models/{version}")
            r.raise_for_status()
        payload = wire.decode(r.content, TINY, expected_kind="weights")
        assert payload.model_version == int(r.headers["X-Model-Version"])
        return payload.model_version, [np.array(t) for t in payload.tensors]


class Device:
    """A registered device speaking the HTTP API."""

    def __init__(self, server: ServerProcess) -> None:
        key = server.registration_key
        r = httpx.post(server.url + "/v1/devices/register", json={"registration_key": key} if key else None,
                       timeout=30.0, verify=server.verify)
        assert r.status_code == 201, r.text
        data = r.json()
        self.id, self.token = data["device_id"], data["token"]
        self.client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60.0,
                                   verify=server.verify)

    def checkin(self, eligible: dict[str, bool] | None = None, model_version: int | None = None) -> dict[str, Any]:
        r = self.client.post("/v1/checkin", json={"eligibility": ELIGIBLE if eligible is None else eligible,
                                                  "model_version": model_version})
        assert r.status_code == 200, r.text
        return r.json()

    def task(self) -> dict[str, Any]:
        answer = self.checkin()
        assert answer["action"] in ("train", "evaluate"), answer
        return answer["task"]

    def upload(self, round_id: int, body: bytes) -> httpx.Response:
        return self.client.post(f"/v1/rounds/{round_id}/update", content=body,
                                headers={"Content-Type": "application/octet-stream"})

    def report(self, round_id: int, results: list[dict[str, Any]]) -> httpx.Response:
        return self.client.post(f"/v1/rounds/{round_id}/eval", json={"results": results})

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------- payloads
def dyadic_delta(seed: int, config: ModelConfig = TINY, scale_bits: int = 12, spread: int = 8) -> list[np.ndarray]:
    """A delta whose values are small multiples of 2^-scale_bits: float64 sums of these are exact."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(-spread, spread + 1, size=shape) / 2.0 ** scale_bits).astype(np.float32)
            for _, shape in config.weight_specs()]


def encode_delta(tensors: Sequence[np.ndarray], base_version: int, num_examples: int = 10,
                 metrics: dict[str, float] | None = None, dtype: str = "float32",
                 config: ModelConfig = TINY, **meta: Any) -> bytes:
    metadata = {"num_examples": num_examples, "metrics": metrics or {}, **meta}
    return wire.encode(list(tensors), config, kind="delta", model_version=base_version, dtype=dtype, metadata=metadata)


def expected_mean(base: Sequence[np.ndarray], deltas: Sequence[Sequence[np.ndarray]],
                  weights: Sequence[float] | None = None) -> list[np.ndarray]:
    """float32(base + sum(w_i d_i) / sum(w_i)) computed in float64, as the server's plain FedAvg does."""
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    out = []
    for k, b in enumerate(base):
        total = np.zeros(b.shape, dtype=np.float64)
        for d, w in zip(deltas, weights):
            total += d[k].astype(np.float64) * w
        out.append((b.astype(np.float64) + 1.0 * (total / sum(weights))).astype(np.float32))
    return out


def assert_weights_equal(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------- fixtures
def wait_for(probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll until probe() is truthy (its value is returned); fail after `timeout` seconds saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def secagg_server(root: Path, n: int, long_s: float) -> ServerProcess:
    """A started tiny-model SecAgg server whose rounds admit exactly `n` devices (min 3) and whose every deadline
    is `long_s`, so a test that waited for one would time out: rounds end by the protocol, not by a clock."""
    args = ["--init-preset", "tiny", "--round-goal", str(n), "--min-count", "3", "--over-admit", "1.0",
            "--secure-aggregation", "secagg", "--clip-norm", "1.0", "--deadline-s", str(long_s),
            "--secagg-stage-s", str(long_s), "--tick-s", "0.05"]
    return ServerProcess(root / "srv", args, root / "srv.log").start()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """start(*args, name="srv") -> ServerProcess (tiny preset model, admin token ADMIN_TOKEN)."""
    started: list[ServerProcess] = []

    def start(*args: str, name: str = "srv", init: bool = True, env: dict[str, str | None] | None = None) -> ServerProcess:
        extra = ["--init-preset", "tiny"] if init else []
        srv = ServerProcess(tmp_path / name, [*extra, *args], tmp_path / f"{name}.log", env=env)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


__all__ = ["ServerProcess", "Device", "ADMIN_TOKEN", "REGISTRATION_KEY", "ELIGIBLE", "TINY", "dyadic_delta", "encode_delta",
           "expected_mean", "assert_weights_equal", "server_factory"]
