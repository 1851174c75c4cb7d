"""The best trial's exported script as an optuna-dashboard artifact: where the artifact store
lives (beside the study's storage), uploading the script once per best trial, and deleting
the former bests' scripts so the study holds one.

Metadata goes where optuna-dashboard lists a trial's artifacts (the study system attr
``dashboard:artifacts:<trial_id>:<artifact_id>``), written through
``kd_optuna.optuna_private``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from kd_optuna import optuna_private
from kd_optuna.run.study_view import as_int, best_distinct

#: Where the artifact directory comes from when no storage-side default applies.
ARTIFACT_DIR_ENV = "KD_OPTUNA_ARTIFACT_DIR"

#: Filename of the exported script stored as trial ``n``'s artifact.
SCRIPT_NAME = "train_trial{number}.py"


def artifact_dir(storage: Any, explicit: str | os.PathLike | None = None) -> Path | None:
    """Where the study's artifacts live: ``explicit``, else ``$KD_OPTUNA_ARTIFACT_DIR``, else
    ``<database>.artifacts`` beside a SQLite file; None for other storages without either.
    ``storage`` is a URL or a study."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ARTIFACT_DIR_ENV):
        return Path(os.environ[ARTIFACT_DIR_ENV])
    if not isinstance(storage, str):
        backend = optuna_private.backend(optuna_private.study_storage(storage))
        engine = getattr(backend, "engine", None)
        if engine is None:
            return None
        url = engine.url
    else:
        from sqlalchemy.engine import make_url

        url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().with_name(Path(url.database).name + ".artifacts")
    return None


def artifact_store(directory: Path | None, create: bool = False):
    """optuna's FileSystemArtifactStore on ``directory`` (made when ``create``), or None; a
    ``directory`` that is a file or cannot be made raises KdOptunaError naming it."""
    from optuna.artifacts import FileSystemArtifactStore

    from kd_optuna.errors import KdOptunaError

    if directory is None:
        return None
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            what = "is a file" if directory.exists() else f"cannot be made ({exc.strerror})"
            raise KdOptunaError(f"artifact directory {str(directory)!r} {what}; give another --artifact-dir "
                                f"or {ARTIFACT_DIR_ENV}") from None
    elif not directory.is_dir():
        return None
    return FileSystemArtifactStore(str(directory))


#: Study system attr prefix under which optuna-dashboard lists a trial's artifacts (its own
#: route for them; a finished trial's system attrs cannot be written, so optuna's
#: ``upload_artifact`` refuses finished trials), followed by ``<trial_id>:<artifact_id>``.
DASHBOARD_TRIAL_ARTIFACT_PREFIX = "dashboard:artifacts:"


def _existing_artifact(study, trial, filename: str, store) -> str | None:
    import json

    from optuna.artifacts.exceptions import ArtifactNotFound

    prefix = f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{optuna_private.trial_id(trial)}:"
    attrs = {k: v for k, v in optuna_private.study_system_attrs(study).items() if k.startswith(prefix)}
    attrs.update({k: v for k, v in optuna_private.trial_system_attrs(study, trial).items() if k.startswith("artifacts:")})
    for key, value in attrs.items():
        if not isinstance(value, str):
            continue
        try:
            meta = json.loads(value)
        except ValueError:
            continue
        if isinstance(meta, Mapping) and meta.get("filename") == filename:
            try:
                store.open_reader(meta["artifact_id"]).close()
                return meta["artifact_id"]
            except (ArtifactNotFound, KeyError, OSError):
                continue
    return None


def upload_best_script(study, config, store, trial=None) -> dict[str, Any] | None:
    """The exported script of the best trial (or ``trial``) as that trial's artifact in ``store``,
    uploaded unless it is there already; {trial, filename, artifact_id, url} or None.

    The file goes to ``store`` under a new uuid and its metadata to the study system attr
    ``dashboard:artifacts:<trial_id>:<artifact_id>``, which optuna-dashboard lists on the
    trial's page and serves at ``url``. Every other script this function stored (a former
    best trial's) is then deleted (:func:`remove_former_scripts`): one script, the best's.
    """
    import json
    import uuid

    from kd_optuna.export.script import write_script

    if store is None or config is None:
        return None
    if trial is None:
        leaders = best_distinct(study.get_trials(deepcopy=False), 1)
        if not leaders:
            return None
        trial = leaders[0]
    filename = SCRIPT_NAME.format(number=trial.number)
    artifact_id = _existing_artifact(study, trial, filename, store)
    if artifact_id is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_script(Path(tmp) / filename, study.study_name, trial, config)
            artifact_id = str(uuid.uuid4())
            with open(path, "rb") as handle:
                store.write(artifact_id, handle)
        meta = {"artifact_id": artifact_id, "filename": filename, "mimetype": "text/x-python", "encoding": None}
        optuna_private.set_study_system_attr(
            study, f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{optuna_private.trial_id(trial)}:{artifact_id}", json.dumps(meta))
    remove_former_scripts(study, store, keep=artifact_id)
    ids = f"{optuna_private.study_id(study)}/{optuna_private.trial_id(trial)}"
    return {"trial": trial.number, "filename": filename, "artifact_id": artifact_id, "url": f"/artifacts/{ids}/{artifact_id}"}


def story_scripts(study) -> list[dict[str, Any]]:
    """The exported scripts :func:`upload_best_script` stored in ``study``, oldest trial first:
    {trial, filename, artifact_id, key} per script still listed on a trial's page.

    A script is one of ours when its metadata sits under :data:`DASHBOARD_TRIAL_ARTIFACT_PREFIX`
    and names ``train_trial<n>.py`` (``text/x-python``) for that trial's own number ``n``.
    """
    import json

    numbers = {optuna_private.trial_id(t): t.number for t in study.get_trials(deepcopy=False)}
    found = []
    for key, value in optuna_private.study_system_attrs(study).items():
        if not key.startswith(DASHBOARD_TRIAL_ARTIFACT_PREFIX) or not isinstance(value, str):
            continue
        trial_part, _, artifact_id = key[len(DASHBOARD_TRIAL_ARTIFACT_PREFIX):].partition(":")
        number = numbers.get(as_int(trial_part))
        try:
            meta = json.loads(value)
        except ValueError:
            continue
        if (number is None or not isinstance(meta, Mapping) or meta.get("artifact_id") != artifact_id
                or meta.get("filename") != SCRIPT_NAME.format(number=number) or meta.get("mimetype") != "text/x-python"):
            continue
        found.append({"trial": number, "filename": meta["filename"], "artifact_id": artifact_id, "key": key})
    return sorted(found, key=lambda a: a["trial"])


def remove_former_scripts(study, store, keep: str | None = None) -> list[int]:
    """Delete every script of :func:`story_scripts` except the artifact ``keep`` (the best
    trial's), so the study holds one; return the trials whose script went.

    As optuna-dashboard's own delete button does it: the file leaves ``store``
    (``ArtifactStore.remove``) and the metadata attr is set to JSON ``null``, which the
    dashboard skips (an optuna storage cannot delete a system attr).
    """
    import json

    from optuna.artifacts.exceptions import ArtifactNotFound

    removed = []
    for script in story_scripts(study):
        if script["artifact_id"] == keep:
            continue
        try:
            store.remove(script["artifact_id"])
        except (ArtifactNotFound, FileNotFoundError):
            pass  # the file is gone already; drop the listing all the same
        optuna_private.set_study_system_attr(study, script["key"], json.dumps(None))
        removed.append(script["trial"])
    return removed
