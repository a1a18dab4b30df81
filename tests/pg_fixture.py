"""A throwaway PostgreSQL cluster for the tests: initdb into a temp dir, postgres listening only on a unix
socket in that dir (no TCP port, nothing to collide with), one fresh database per test or server, all of it
stopped and removed at the end.

initdb refuses to run as root (CI runs as root): then the cluster runs as the unprivileged `postgres` user
(Debian's postgresql package creates it) through runuser, in a directory it owns. The binaries come from
$FK_PG_BIN, else `initdb` on PATH, else the newest /usr/lib/postgresql/*/bin. Without them the PostgreSQL tests
fail and say why; they skip only when FK_SKIP_POSTGRES=1 is set.

FK_TEST_DATABASE=postgresql runs every test server of tests/server_fixtures.py on its own database here, so
any server test file runs against PostgreSQL: `FK_TEST_DATABASE=postgresql pytest tests/test_server_rounds.py`.
FK_TEST_DATABASE=postgresql-cluster also starts them with --cluster (server/cluster.py: the round lock and the
aggregator's lease in the database, no row caches), except those with secure aggregation, which --cluster refuses.

    from tests.pg_fixture import pg_url  # noqa: F401 - a fixture: a fresh database's URL per test
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

SKIP_ENV = "FK_SKIP_POSTGRES"
BIN_ENV = "FK_PG_BIN"
RUN_AS = ("postgres", "nobody")  # the first that exists runs the cluster when the tests run as root


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    if os.environ.get(BIN_ENV):
        return Path(os.environ[BIN_ENV])
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def require_pg_bin() -> Path:
    """The binaries' directory; otherwise fail the test with what to do (skip only under FK_SKIP_POSTGRES=1)."""
    found = find_pg_bin()
    if found is not None and (found / "initdb").exists():
        return found
    message = (f"PostgreSQL binaries not found (no initdb in ${BIN_ENV}, on PATH or in /usr/lib/postgresql/*/bin): "
               f"install Debian's postgresql package (scripts/setup.sh does), or set {SKIP_ENV}=1 to skip these tests")
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message)


def _unprivileged_user() -> str:
    for name in RUN_AS:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail(f"running as root, and none of the users {RUN_AS} exists to run PostgreSQL as (initdb refuses root)")


class PgCluster:
    """One postgres server on a unix socket in a temp dir. `durable`: PostgreSQL's default fsync and commit
    durability (for benchmarks); else (tests) no flushes."""

    def __init__(self, bin_dir: Path, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="fkpg-", dir="/tmp"))  # short: a socket path has ~100 bytes
        self.data = self.root / "data"
        self.user = _unprivileged_user() if os.geteuid() == 0 else None
        self.running = False

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / cmd[0]), *cmd[1:]]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{self.log()}")
        return done

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self) -> "PgCluster":
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # Tests measure behaviour, not durability: no fsync makes each commit ~1 ms instead of a disk flush.
        fast = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        options = (f"-c listen_addresses='' -c unix_socket_directories={self.root} {fast}-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60",
                  "-o", options, "start")
        self.running = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.root}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


_shared: PgCluster | None = None
_shared_lock = threading.Lock()


def shared_cluster() -> PgCluster:
    """The test process's one cluster, started on first use (about 2 s) and removed when the process exits."""
    global _shared
    with _shared_lock:
        if _shared is None:
            cluster = PgCluster(require_pg_bin())
            atexit.register(cluster.stop)
            _shared = cluster.start()
        return _shared


DATABASE_ENV = "FK_TEST_DATABASE"  # "postgresql": every test server (tests/server_fixtures.ServerProcess) on PostgreSQL
_server_databases: dict[Path, str] = {}


def server_database_args(data_dir: Path) -> list[str]:
    """["--database", URL] for a test server when FK_TEST_DATABASE=postgresql, else [] (SQLite in the data dir).
    One database per data dir, kept while the process runs: a restarted server finds its rows again."""
    engine = os.environ.get(DATABASE_ENV, "sqlite")
    if engine == "sqlite":
        return []
    if engine not in ("postgresql", "postgresql-cluster"):
        raise ValueError(f"{DATABASE_ENV} must be sqlite, postgresql or postgresql-cluster, not {engine!r}")
    key = Path(data_dir).resolve()
    with _shared_lock:
        url = _server_databases.get(key)
    if url is None:
        url = shared_cluster().create_database()
        with _shared_lock:
            url = _server_databases.setdefault(key, url)
    return ["--database", url, *(["--cluster"] if engine == "postgresql-cluster" else [])]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the shared throwaway cluster."""
    yield shared_cluster().create_database()


__all__ = ["DATABASE_ENV", "PgCluster", "SKIP_ENV", "find_pg_bin", "pg_url", "require_pg_bin", "server_database_args",
           "shared_cluster"]
