"""A private PostgreSQL server for tests: initdb + pg_ctl as the ``postgres`` user.

The data directory lives in a fresh temporary directory owned by ``postgres``; the server
listens on 127.0.0.1 only, on a free port, with password authentication (so tests can check
that the password never shows). ``stop()`` always removes the directory.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/bin")


def find_binary(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def missing_reason() -> str | None:
    """Why no private server can start here, or None."""
    if find_binary("initdb") is None or find_binary("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to own the server"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    data_dir: Path
    port: int
    password: str
    _root: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def new_database(self, prefix: str = "t_") -> str:
        """Create an empty database ``<prefix><random hex>`` on this server; its URL."""
        import sqlalchemy

        from kd_optuna.run.storage import resolve_url

        name = prefix + secrets.token_hex(4)
        engine = sqlalchemy.create_engine(resolve_url(self.url), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _as_postgres([find_binary("pg_ctl"), "-D", str(self.data_dir), *args], check=check)

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", "60", "-l", str(self._root / "server.log"), "restart", "-o", self._options())

    def _options(self) -> str:
        return f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self._root} -c max_connections=100"

    def stop(self) -> None:
        try:
            result = self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop", check=False)
            if result.returncode != 0:
                self._pg_ctl("-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


def _as_postgres(command: list, check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed: {result.stderr.strip()[-500:]}")
    return result


def start() -> PgServer:
    """Start a server; the caller must call ``stop()``."""
    root = Path(tempfile.mkdtemp(prefix="kd_optuna_pg_"))
    server = PgServer(root / "data", _free_port(), "pw_" + secrets.token_hex(8), root)
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(root, entry.pw_uid, entry.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        _as_postgres([
            find_binary("initdb"), "-D", str(server.data_dir), "-U", "postgres", "--pwfile", str(pwfile),
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync",
        ])
        pwfile.unlink()
        server._pg_ctl("-w", "-t", "60", "-l", str(root / "server.log"), "-o", server._options(), "start")
    except BaseException:
        server.stop()
        raise
    return server
