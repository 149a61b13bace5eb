"""A real PgBouncer for the tests: a process of the system's ``pgbouncer`` binary (the Debian
package ``pgbouncer``), started in a temporary directory on a free port in transaction pooling
mode, in front of the session's PostgreSQL server.

Its pool is small on purpose (``POOL_SIZE`` server connections per user and database): the
nodes of a test open more client connections than that, so that consecutive transactions of one
client connection run on different server sessions, and one server session serves several
clients — what breaks session state, prepared statements and ``LISTEN``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from _db import LOCAL_HOST, free_port

POOL_SIZE = 2
"""Server connections per user and database."""
START_BOUND = 30.0
"""Seconds the process may take to accept connections (a bound, reported as a failure)."""
SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin")


class PgBouncerUnavailableError(Exception):
    """No ``pgbouncer`` binary; the message is the skip reason."""


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (str(Path(d) / "pgbouncer") for d in SEARCH if (Path(d) / "pgbouncer").is_file()), None
    )
    if found is None:
        raise PgBouncerUnavailableError(
            "PgBouncer not available: no pgbouncer binary (apt-get install pgbouncer)"
        )
    return found


class PgBouncer:
    """``pgbouncer`` in transaction pooling mode in front of the server of ``server_url`` (an
    SQLAlchemy ``postgresql+asyncpg://`` URL); ``url`` goes through it, without our
    parameters."""

    def __init__(self, binary: str, server_url: str) -> None:
        self.binary = binary
        self.server = urlsplit(server_url)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="aioasync-tasks-pgbouncer-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def database(self) -> str:
        return self.server.path.lstrip("/") or "postgres"

    @property
    def url(self) -> str:
        user = self.server.username or "postgres"
        password = f":{self.server.password}" if self.server.password else ""
        return f"postgresql+asyncpg://{user}{password}@{LOCAL_HOST}:{self.port}/{self.database}"

    def pooled_url(self, *, listen: bool) -> str:
        """``url`` in the library's mode for it (``pgbouncer=transaction``); with ``listen``,
        ``LISTEN`` on a direct connection to the server."""
        url = f"{self.url}?pgbouncer=transaction"
        if listen:
            url += f"&listen_host={self.server.hostname}&listen_port={self.server.port or 5432}"
        return url

    def _write_config(self) -> Path:
        user = self.server.username or "postgres"
        password = f" password={self.server.password}" if self.server.password else ""
        (self.tmpdir / "users.txt").write_text(f'"{user}" ""\n')
        config = self.tmpdir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"{self.database} = host={self.server.hostname or LOCAL_HOST}"
            f" port={self.server.port or 5432} dbname={self.database} user={user}{password}\n"
            "[pgbouncer]\n"
            f"listen_addr = {LOCAL_HOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.tmpdir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {POOL_SIZE}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.tmpdir / 'pgbouncer.log'}\n"
        )
        return config

    def start(self) -> None:
        self.port = free_port()
        config = self._write_config()
        command = [self.binary, str(config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it switches to an unprivileged user (-u).
            user = _unprivileged_user()
            account = pwd.getpwnam(user)
            for path in (self.tmpdir, *self.tmpdir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            command[1:1] = ["-u", user]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_BOUND
        while not _accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"pgbouncer did not start: {log[-500:]}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.tmpdir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PgBouncerUnavailableError("running as root, and no 'postgres' or 'nobody' user")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOCAL_HOST, port), timeout=1.0):
            return True
    except OSError:
        return False
