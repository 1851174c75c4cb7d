"""Storage URLs: validation, password masking, heartbeat settings, our studies only."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from conftest import create_kd_study
from kd_optuna.run.storage import (
    StorageError,
    check_url,
    filesystem_type,
    load_study,
    mask_secrets,
    mask_url,
    open_storage,
    resolve_url,
    study_config,
)


def test_mask_url_hides_the_password_only():
    assert mask_url("postgresql://kd:s3cr%40t@db.example:5432/kd") == "postgresql://kd:***@db.example:5432/kd"
    assert mask_url("sqlite:///kd_optuna.db") == "sqlite:///kd_optuna.db"
    assert mask_url("postgresql://kd@host/db") == "postgresql://kd@host/db"


def test_mask_secrets_removes_raw_and_decoded_passwords_anywhere():
    url = "postgresql://kd:p%40ss@h/db"
    text = 'could not connect with password "p@ss" and p%40ss to postgresql://kd:p%40ss@h/db'
    masked = mask_secrets(text, url)
    assert "p@ss" not in masked and "p%40ss" not in masked
    assert masked.count("***") == 3


@pytest.mark.parametrize(
    "url, words",
    [
        ("not a url", ["not a database URL"]),
        ("redis://localhost:6379", ["redis", "not supported"]),
        ("sqlite://", ["in-memory"]),
        ("sqlite:///:memory:", ["in-memory"]),
        ("sqlite:////no/such/dir/x.db", ["/no/such/dir", "does not exist"]),
        ("sqlite:////tmp", ["'/tmp' is a directory", "database file"]),
    ],
)
def test_bad_urls_are_refused_with_the_fix(url, words):
    with pytest.raises(StorageError) as info:
        check_url(url)
    for word in words:
        assert word in str(info.value)


def test_plain_postgresql_url_gets_an_installed_driver():
    resolved = resolve_url("postgresql://u:pw@127.0.0.1:5432/db")
    assert resolved.startswith(("postgresql+psycopg2://", "postgresql://", "postgresql+psycopg://"))
    assert "u:pw@127.0.0.1:5432/db" in resolved


def test_unreachable_server_error_is_masked():
    with pytest.raises(StorageError) as info:
        open_storage("postgresql://kd:TopSecret99@127.0.0.1:1/db", heartbeat_interval=None)
    assert "TopSecret99" not in str(info.value) and "***" in str(info.value)


def test_a_sqlite_path_under_the_home_directory_opens_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    create_kd_study("sqlite:///~/home.db", name="h")
    assert (tmp_path / "home.db").is_file() and not (tmp_path / "~").exists()
    assert load_study(open_storage("sqlite:///~/home.db", must_exist=True), "h", "sqlite:///~/home.db").study_name == "h"


def test_heartbeat_and_retry_are_configured(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=3, grace_period=7)
    assert storage.get_heartbeat_interval() == 3 and storage.grace_period == 7
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)
    plain = open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=None)
    assert plain.get_heartbeat_interval() is None


def test_sqlite_runs_in_wal_mode_with_a_long_busy_timeout(tmp_path):
    import sqlalchemy

    storage = open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    with storage.engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert connection.execute(sqlalchemy.text("PRAGMA busy_timeout")).scalar() >= 60_000


def test_must_exist_does_not_create_a_sqlite_file(tmp_path):
    path = tmp_path / "absent.db"
    with pytest.raises(StorageError, match="create-study"):
        open_storage(f"sqlite:///{path}", must_exist=True)
    assert not path.exists()


@pytest.mark.parametrize("name", ["s.db", "a dir#1/s.db"])
def test_an_open_existing_sqlite_file_deleted_later_is_not_recreated_empty(tmp_path, name):
    """A worker that reconnects after the study's file was deleted gets an error, not a new
    empty database where the study was (which the deleted-file watch would then read as the
    study replaced, and which the user would find instead of the error)."""
    import sqlalchemy

    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    url = f"sqlite:///{path}"
    create_kd_study(url, name="s")
    storage = open_storage(url, heartbeat_interval=None, must_exist=True)
    assert load_study(storage, "s", url).study_name == "s"
    storage.engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="unable to open database file"):
        with storage.engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    assert not path.exists()


def test_unknown_study_lists_the_studies_there(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_kd_study(url, name="mine")
    with pytest.raises(StorageError, match="'mine'"):
        load_study(open_storage(url), "theirs", url)


def test_study_created_by_plain_optuna_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(storage=url, study_name="plain")
    study = load_study(open_storage(url), "plain", url)
    with pytest.raises(StorageError, match="plain Optuna"):
        study_config(study)


def test_a_stored_config_this_version_cannot_read_says_so(tmp_path):
    """A study created by a newer kd-optuna holds keys this one lacks: the line says why."""
    import json

    from kd_optuna.run.config import CONFIG_ATTR

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url, name="s")
    stored = json.loads(study.user_attrs[CONFIG_ATTR])
    stored["proxy"]["future_knob"] = 3
    study.set_user_attr(CONFIG_ATTR, json.dumps(stored))
    with pytest.raises(StorageError) as info:
        study_config(load_study(open_storage(url), "s", url))
    message = str(info.value)
    assert "unknown key 'future_knob'" in message and "created by another version?" in message
    assert "\n" not in message


def test_stored_config_is_read_back(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_kd_study(url, name="s")
    config = study_config(load_study(open_storage(url), "s", url))
    assert config.data.dataset == "digits" and config.student.model == "digits_student"


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
server:/export/home /home/ann nfs4 rw,vers=4.2 0 0
//nas/lab /mnt/lab\\040share cifs rw 0 0
"""


@pytest.mark.parametrize("path, kind", [
    ("/home/ann/study.db", "nfs4"),
    ("/home/ann/runs/new/study.db", "nfs4"),
    ("/home/annette/study.db", "ext4"),
    ("/mnt/lab share/study.db", "cifs"),
    ("/tmp/study.db", "ext4"),
])
def test_filesystem_type_takes_the_deepest_mount_holding_the_file(path, kind):
    assert filesystem_type(Path(path), MOUNTS) == kind


def test_a_sqlite_file_on_a_network_filesystem_gets_a_warning_naming_postgresql(tmp_path, monkeypatch, caplog):
    import kd_optuna.run.storage as storage

    real = storage.filesystem_type
    monkeypatch.setattr(storage, "filesystem_type", lambda path: real(path, f"nfs:/x {tmp_path} nfs4 rw 0 0\n"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with caplog.at_level("WARNING", logger="kd_optuna"):
        open_storage(url, heartbeat_interval=None)
        open_storage(url, heartbeat_interval=None, check_filesystem=False)
    (record,) = caplog.records
    assert "network filesystem (nfs4)" in record.getMessage() and "PostgreSQL" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="kd_optuna"):
        open_storage(f"sqlite:///{tmp_path.parent / 'local.db'}", heartbeat_interval=None)
    assert not caplog.records


def test_optuna_s_wrapped_database_errors_are_described_by_their_cause_masked():
    import sqlalchemy.exc

    from kd_optuna.run.storage import DATABASE_ERRORS, describe_error

    url = "postgresql://kd:hunter2@db/kd"
    cause = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("password hunter2 refused\nDETAIL: more"))
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
    except DATABASE_ERRORS as exc:
        assert describe_error(exc, url) == "password *** refused"


@pytest.fixture
def read_only():
    """``read_only(directory)`` makes ``directory`` unwritable for this process: mode 555, or,
    as root (whom modes do not stop), a read-only bind mount of it; skips where neither can."""
    import os
    import subprocess

    made: list[Path] = []
    mounted: list[Path] = []

    def make(directory: Path) -> None:
        made.append(directory)
        directory.chmod(0o555)
        if os.access(directory, os.W_OK):
            done = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True)
            if done.returncode == 0:
                mounted.append(directory)
                subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], capture_output=True)
        if os.access(directory, os.W_OK):
            pytest.skip("cannot make a directory read-only here (root without mount)")

    yield make
    for directory in mounted:
        subprocess.run(["umount", "--lazy", str(directory)], capture_output=True)
    for directory in made:
        directory.chmod(0o755)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_sqlite_study_in_a_read_only_directory_is_refused_at_once_by_writing_commands(
    tmp_path, read_only, capsys, journal
):
    import sqlite3

    from kd_optuna.run.cli import main

    create_kd_study(f"sqlite:///{tmp_path / 'made.db'}", name="s")
    directory = tmp_path / "archive"
    directory.mkdir()
    url = f"sqlite:///{directory / 's.db'}"
    with sqlite3.connect(tmp_path / "made.db") as made, sqlite3.connect(directory / "s.db") as copy:
        made.backup(copy)
        copy.execute(f"PRAGMA journal_mode = {journal}")
    copy.close()
    read_only(directory)
    before = sorted(p.name for p in directory.iterdir())
    for args in (["optimize", "--n-trials", "3", "--no-progress"], ["create-study", "digits", "--study-name", "t"],
                 ["compare", "--methods", "kd", "--seeds", "1"]):
        with pytest.raises(SystemExit) as info:
            main([*args, "--storage", url])
        assert info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "read-only" in line and "writable directory" in line, line
    assert sorted(p.name for p in directory.iterdir()) == before


def test_create_study_refuses_a_new_sqlite_file_in_a_read_only_directory(tmp_path, read_only):
    directory = tmp_path / "ro"
    directory.mkdir()
    read_only(directory)
    with pytest.raises(StorageError, match="directory .* is read-only"):
        open_storage(f"sqlite:///{directory / 'new.db'}", heartbeat_interval=None, writable=True)
    assert not (directory / "new.db").exists()


def test_a_raw_at_sign_in_a_password_is_refused_and_no_piece_of_the_password_shows(capsys):
    from kd_optuna.run.cli import main

    url = "postgresql://kd:S3cr@t/x:y%z@127.0.0.1:1/kd"
    assert mask_url(url) == "postgresql://kd:***@127.0.0.1:1/kd"
    with pytest.raises(StorageError, match="%40") as info:
        check_url(url)
    assert "t/x" not in str(info.value) and "y%z" not in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["trials", "--storage", url])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "%40" in err
    assert "S3cr" not in err and "t/x" not in err and "y%z" not in err
