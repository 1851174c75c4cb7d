"""Storage URLs: validation, password masking, RDB storages with a heartbeat, our studies.

Every command takes a SQLAlchemy URL: ``sqlite:///kd_optuna.db`` (the default, one machine) or
``postgresql://user:password@host:5432/db`` (many machines). A password never reaches a
message: :func:`mask_url` and :func:`mask_secrets` replace it with ``***``.

SQLite under several worker processes: every connection waits up to ``SQLITE_TIMEOUT_S`` for
a lock instead of failing with "database is locked", and the database runs in WAL mode
(readers do not block the writer). WAL needs a local filesystem: a SQLite file on NFS, SMB or
another network filesystem (read from ``/proc/mounts``) gets a warning that names PostgreSQL.
A command that writes the study refuses a SQLite file it could not write (read-only file,
directory or filesystem) at once, instead of failing its first commit.

With a heartbeat, a RUNNING trial whose worker has not written a heartbeat for
``grace_period`` seconds is failed by the next worker that asks for a trial, and
``RetryHeartbeatStaleTrialCallback`` queues a copy of it (same params) as WAITING, which the
next ``ask`` runs.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from kd_optuna import __version__
from kd_optuna.run.config import CONFIG_ATTR, ConfigError, StudyConfig
from kd_optuna.errors import KdOptunaError

DEFAULT_STORAGE = "sqlite:///kd_optuna.db"
SQLITE_TIMEOUT_S = 120
DEFAULT_HEARTBEAT_S = 20
DEFAULT_MAX_RETRY = 3
SUPPORTED_BACKENDS = ("sqlite", "postgresql", "mysql")

#: Filesystem types (``/proc/mounts``) whose locking SQLite's WAL mode cannot rely on.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "glusterfs", "ceph",
    "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone",
})

#: ``scheme://user:PASSWORD@``, the password running to the last ``@`` of the URL: a raw ``@`` in
#: a password (which should be %40) must not leave the rest of it in plain sight.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>\S*)(?P<at>@)")


#: What a storage call raises when the database cannot be reached or refuses a commit: the
#: driver's error through SQLAlchemy, or Optuna's wrapper of it (RDBStorage's own calls).
DATABASE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, optuna.exceptions.StorageInternalError)


class StorageError(KdOptunaError):
    """A storage URL that cannot be used, a database that cannot be reached, a foreign study."""


def mask_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['at']}", str(url))


def url_password(url: str) -> str | None:
    match = _URL_PASSWORD.search(str(url))
    return match["password"] if match and match["password"] else None


def mask_secrets(text: str, *urls: str) -> str:
    """``text`` with URL passwords masked, and the passwords of ``urls`` removed wherever they
    appear (raw or percent-decoded), as in driver error messages."""
    text = mask_url(text)
    for url in urls:
        password = url_password(url)
        if password:
            for form in {password, urllib.parse.unquote(password)}:
                if len(form) >= 1:
                    text = text.replace(form, "***")
    return text


def check_url(url: str) -> sqlalchemy.engine.URL:
    """Parse ``url``; a malformed or unsupported URL raises StorageError saying what to give."""
    hint = "give e.g. sqlite:///kd_optuna.db or postgresql://user@host:5432/db"
    if str(url).partition("://")[2].count("@") > 1:
        raise StorageError(
            f"storage {mask_url(url)!r} holds '@' more than once: percent-encode an '@' in the user name or "
            "password as %40 (and a '%' as %25)"
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StorageError(f"storage {mask_url(url)!r} is not a database URL; {hint}") from None
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise StorageError(f"storage {mask_url(url)!r} uses {backend!r}, which is not supported; {hint}")
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            raise StorageError(
                f"storage {mask_url(url)!r} is an in-memory database that worker processes cannot share; "
                "give a file, e.g. sqlite:///kd_optuna.db"
            )
        parent = Path(database).expanduser().parent
        if not parent.is_dir():
            raise StorageError(f"storage {mask_url(url)!r}: directory {str(parent)!r} does not exist; create it first")
        if Path(database).expanduser().is_dir():
            raise StorageError(f"storage {mask_url(url)!r}: {database!r} is a directory; give the path of a database file in it")
    if backend == "postgresql":
        try:
            parsed.get_dialect().import_dbapi()
        except ImportError:
            if parsed.drivername != "postgresql":
                raise StorageError(
                    f"the driver of {parsed.drivername!r} is not installed; install it or use postgresql+psycopg2://"
                ) from None
            parsed = parsed.set(drivername="postgresql+psycopg2")
            try:
                parsed.get_dialect().import_dbapi()
            except ImportError:
                raise StorageError("PostgreSQL storages need psycopg2: pip install 'kd-optuna[postgres]'") from None
    return parsed


def resolve_url(url: str) -> str:
    """``url`` as given, except ``postgresql://`` names the installed driver (psycopg or psycopg2),
    and a SQLite path starting with ``~`` names the home directory, as :func:`check_url` and the
    artifact store read it (SQLite itself would look for a folder named ``~``)."""
    parsed = check_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database.startswith("~"):
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    given = make_url(url)
    if (parsed.drivername, parsed.database) != (given.drivername, given.database):
        return parsed.render_as_string(hide_password=False)
    return url


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    except Exception:  # another process holds the file while switching; WAL is persistent anyway
        pass
    finally:
        cursor.close()


def _open_existing_sqlite(path: Path) -> Callable[[], sqlite3.Connection]:
    """A connection factory for the existing SQLite file ``path``: SQLite's ``mode=rw`` URI opens
    it for writing and fails ("unable to open database file") where it is gone, where a plain
    open would create an empty database in its place."""
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=rw"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)

    return connect


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem that holds ``path`` (``ext4``, ``nfs4``...), from the
    ``mounts`` table (``/proc/mounts`` by default); None where it cannot be told."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = Path(path).expanduser().absolute()
    target = target.parent.resolve() / target.name
    found, depth = None, -1
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1]))
        if (point == target or point in target.parents) and len(point.parts) > depth:
            found, depth = fields[2], len(point.parts)
    return found


def _warn_if_network_filesystem(database: str, url: str) -> None:
    kind = filesystem_type(Path(database))
    if kind in NETWORK_FILESYSTEMS:
        logging.getLogger("kd_optuna").warning(
            "the SQLite file %s is on a network filesystem (%s), where its locks are unreliable and "
            "trials can be lost; keep it on a local disk, or use PostgreSQL for workers on several machines",
            mask_url(url), kind,
        )


def sqlite_read_only_reason(database: str) -> str | None:
    """Why this process cannot write the SQLite ``database`` (a read-only file, or a read-only
    directory, where SQLite cannot create the journal and WAL files it writes beside the
    file), or None when it can."""
    path = Path(database).expanduser()
    if path.exists() and not os.access(path, os.W_OK):
        return f"the file {str(path)!r} is read-only"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return (f"its directory {str(path.parent)!r} is read-only (SQLite writes its journal and "
                "WAL files beside the database)")
    return None


def open_storage(
    url: str = DEFAULT_STORAGE,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
    must_exist: bool = False,
    check_filesystem: bool = True,
    writable: bool = False,
) -> optuna.storages.RDBStorage:
    """An RDBStorage for ``url``; with ``heartbeat_interval`` (seconds) a heartbeat whose stale
    trials are failed after ``grace_period`` (default 2 x interval) and retried ``max_retry`` times.
    ``must_exist``: a SQLite file that is not there raises StorageError instead of being created,
    and every connection opens it read-write without creating it (:func:`_open_existing_sqlite`),
    so a file deleted under running workers is not replaced by an empty one.
    ``check_filesystem``: warn when a SQLite file is on a network filesystem (workers, whose
    parent has warned, pass False). ``writable``: a SQLite file this process cannot write raises
    StorageError saying why (commands that write the study)."""
    parsed = check_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    if must_exist and sqlite and not Path(parsed.database).expanduser().is_file():
        raise StorageError(
            f"no database file {parsed.database!r}; create a study first with `kd-optuna create-study CONFIG`"
            " or give --storage"
        )
    read_only = sqlite_read_only_reason(parsed.database) if sqlite else None
    fix = "copy the database to a writable directory (or make it writable), or give another --storage"
    if writable and read_only:
        raise StorageError(f"storage {mask_url(url)} cannot be written: {read_only}; {fix}")
    if check_filesystem and sqlite:
        _warn_if_network_filesystem(parsed.database, url)
    engine_url = resolve_url(url)
    engine_kwargs: dict[str, Any] = {}
    if sqlite and must_exist:
        engine_kwargs["creator"] = _open_existing_sqlite(Path(parsed.database).expanduser())
    elif sqlite:
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    heartbeat: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval is not None:
            heartbeat = {
                "heartbeat_interval": int(heartbeat_interval),
                "grace_period": int(grace_period or 2 * heartbeat_interval),
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            }
        try:
            storage = optuna.storages.RDBStorage(engine_url, engine_kwargs=engine_kwargs, **heartbeat)
        except (SQLAlchemyError, OSError, ImportError, RuntimeError, ValueError) as exc:
            hint = f"; {read_only}: {fix}" if read_only else ""
            raise StorageError(f"cannot open storage {mask_url(url)}: {describe_error(exc, url)}{hint}") from None
    if sqlite:
        event.listen(storage.engine, "connect", _on_sqlite_connect)
        storage.engine.dispose()
    return storage


class SqliteFileWatch:
    """Whether the SQLite file of ``url`` is still the file that was there when the watch began.

    A database file deleted, moved or replaced under running workers raises no error: their open
    connections go on writing into the unlinked file, and every trial written since is lost
    with it. :meth:`lost` says so; for another backend it is always None.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._path = Path(parsed.database).expanduser() if parsed.get_backend_name() == "sqlite" else None
        self._identity = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            status = self._path.stat()
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def lost(self) -> str | None:
        """``the SQLite file 'x.db' was deleted or moved`` (or ``replaced by another file``), or None."""
        if self._identity is None:
            return None
        now = self._stat()
        if now == self._identity:
            return None
        return f"the SQLite file {str(self._path)!r} was {'deleted or moved' if now is None else 'replaced by another file'}"


def describe_error(exc: BaseException, url: str) -> str:
    """One masked line for a database error: its first line, without SQL or parameters.
    Optuna's StorageInternalError is described by the driver error it wraps."""
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), exc.__class__.__name__)
    return mask_secrets(first, url)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def load_study(storage: optuna.storages.BaseStorage, study_name: str, url: str, sampler: Any = None,
               pruner: Any = None) -> optuna.Study:
    """The study ``study_name``; an unknown name raises StorageError listing those there are.

    ``pruner`` defaults to no pruning, not Optuna's MedianPruner: the evolutionary search
    needs completed trials as parents, and on digits (benchmarks/sampler_search.py, 40 trials,
    3 seeds) median pruning kept EvolutionSampler at vanilla KD's score (0.1067) where without
    it every seed beat KD (median 0.0909).
    """
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                                 pruner=pruner or optuna.pruners.NopPruner())
    except KeyError:
        names = study_names(storage)
        known = ", ".join(repr(n) for n in names) if names else "none"
        raise StorageError(
            f"no study {study_name!r} in {mask_url(url)} (studies there: {known}); "
            "create it with `kd-optuna create-study CONFIG`"
        ) from None


def stored_config_text(study: optuna.Study) -> str:
    """The JSON of the config create-study stored in ``study``, unread; a study without one
    (plain Optuna) raises StorageError."""
    text = study.user_attrs.get(CONFIG_ATTR)
    if text is None:
        raise StorageError(
            f"study {study.study_name!r} has no kd-optuna config (was it created by plain Optuna?); "
            "create a study with `kd-optuna create-study CONFIG --study-name NAME`"
        )
    return text


def study_config(study: optuna.Study) -> StudyConfig:
    """The config create-study stored in ``study``; a study without one, or with one this
    version cannot read, raises StorageError."""
    text = stored_config_text(study)
    try:
        return StudyConfig.from_json(text, source=f"config stored in study {study.study_name!r}", check_models=False)
    except ConfigError as exc:
        raise StorageError(
            f"{exc}; this kd-optuna {__version__} cannot read it: was the study created by another version? "
            "run that version on it, or create the study again with this one"
        ) from None
