"""A throwaway PostgreSQL server for the test session, and a fresh database for each test.

The server is the real thing (PostgreSQL's own ``initdb`` and ``pg_ctl``), started once per
session in a temporary directory and reachable only through a Unix socket there, so parallel
test runs on one machine never fight over a port. ``initdb`` refuses to run as root; under
root the server runs as the ``postgres`` user. A missing server fails the tests with a clear
message instead of skipping them: a skipped test would hide a broken install
(``scripts/ensure-postgres.sh`` installs it; ``make test`` runs that first).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_SETTINGS = {
    # Only the socket: no port to collide with another run or a system server.
    "listen_addresses": "''",
    # A throwaway server: durability is not under test, speed is welcome.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    # An autovacuum worker inside the template makes CREATE DATABASE ... TEMPLATE fail
    # ("source database is being accessed by other users").
    "autovacuum": "off",
}
TEMPLATE = "ltxbot_template"
_MISSING = (
    "PostgreSQL's initdb/pg_ctl were not found (looked at $LTXBOT_PG_BINDIR, PATH and /usr/lib/postgresql/*/bin). "
    "Run scripts/ensure-postgres.sh (make test does) or install PostgreSQL 15."
)


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and psql; the newest Debian-packaged one when several."""
    candidates: list[Path] = []
    if os.environ.get("LTXBOT_PG_BINDIR"):
        candidates.append(Path(os.environ["LTXBOT_PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        # Debian links /usr/bin/initdb-like names to the versioned directory; pg_ctl looks for
        # `postgres` beside its real self.
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(debian.glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        candidates.extend(reversed(versions))
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "psql")):
            return bindir
    return None


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's tmp_path: that is private to the invoking user, and the server may
        # run as `postgres`. A short path also keeps the socket under the 107-byte limit.
        self.root = Path(tempfile.mkdtemp(prefix="ltxbot-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.run_as = _run_as_prefix()
        self.running = False
        self._names = itertools.count(1)

    def _server_cmd(self, *args: str) -> list[str]:
        return [*self.run_as, *args]

    def start(self) -> None:
        if self.run_as:
            shutil.chown(self.root, user="postgres", group=None)
        self._check(self._server_cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                                     "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"), "initdb")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"unix_socket_directories = '{self.root}'\n")
            conf.writelines(f"{key} = {value}\n" for key, value in SERVER_SETTINGS.items())
        self._check(self._server_cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                     "-w", "-t", "60", "start"), "pg_ctl start")
        self.running = True
        self.sql(f"CREATE DATABASE {TEMPLATE}")
        self.sql(f"ALTER DATABASE {TEMPLATE} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")

    def stop(self) -> None:
        if self.running:
            self.running = False
            subprocess.run(self._server_cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                            "-w", "stop"), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement through psql as the superuser; its unaligned output."""
        done = self._check([str(self.bindir / "psql"), "-h", str(self.root), "-U", "postgres", "-d", database,
                            "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", statement], "psql")
        return done.stdout.strip()

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={self.root}"

    def create_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a connection a failed test left open must not keep the database alive.
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _check(self, cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{log}")
        return done


def _run_as_prefix() -> list[str]:
    """initdb refuses root; run the server as `postgres` then."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("the tests run as root and there is no `postgres` user to run PostgreSQL as "
                    "(scripts/ensure-postgres.sh installs the server, which creates it)")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    return ["su", "postgres", "-s", "/bin/sh", "-c", "exec \"$0\" \"$@\""]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(_MISSING)
    server = PostgresServer(bindir)
    atexit.register(server.stop)  # also when the session dies before its teardown
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        pytest.fail(f"could not start the test PostgreSQL server from {bindir}: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


__all__ = ["PostgresServer", "find_bindir", "pg_url", "postgres_server"]
