"""A real PostgreSQL server for the tests (``postgres_server`` in tests/conftest.py): Debian's
``postgresql`` binaries, one server per test session, listening only on a Unix socket in a temp
folder, and a fresh database per test (``create_database``), dropped after it.

initdb and postgres refuse to run as root: under root they run as the unprivileged ``postgres``
user (runuser), in a folder that user owns. Durability is switched off (fsync, synchronous_commit):
the server and its data live only as long as the session.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

SYSTEM_USER = "postgres"


class PostgresUnavailable(Exception):
    """Why the tests cannot have a PostgreSQL server here (they skip with this reason)."""


def server_binaries() -> Path:
    """The folder of initdb and pg_ctl: pg_config's, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        candidates.append(Path(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")


class PostgresServer:
    """One throwaway cluster; ``url(name)`` is a database on it, reached through its Unix socket."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401 - only to say why, up front, if the driver is missing
        except ImportError as exc:
            raise PostgresUnavailable(f"psycopg is not installed ({exc}): pip install -e '.[test]'") from None
        self.bin = server_binaries()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is missing: cannot start postgres unprivileged")
            self.as_user = ["runuser", "-u", SYSTEM_USER, "--"]
        self.root = Path(tempfile.mkdtemp(prefix="vad-postgres-"))
        if self.as_user:
            try:
                shutil.chown(self.root, user=SYSTEM_USER)
            except LookupError:
                shutil.rmtree(self.root)
                raise PostgresUnavailable(f"running as root and there is no {SYSTEM_USER!r} user to run postgres as") from None
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 5432  # only names the socket file in self.root: no TCP port is opened
        self.superuser = "postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{Path(args[0]).name} failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-2000:]}\n{log}")

    def start(self) -> "PostgresServer":
        """initdb, then the server; PostgresUnavailable (and nothing left behind) when either fails."""
        options = (f"-c listen_addresses='' -c unix_socket_directories={self.root} -p {self.port} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        try:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.superuser, "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                      "-o", options, "start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, name: str) -> str:
        return f"postgresql://{self.superuser}@/{name}?host={self.root}&port={self.port}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"vad_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop it, closing what is still connected (a killed worker's connection, say)."""
        name = url.split("?", 1)[0].rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
