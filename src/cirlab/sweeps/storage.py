"""Where a study lives: opening and loading Optuna storage, and the sweep folder's pointer to it.

The driver writes ``<sweep_dir>/study.json`` (:data:`STUDY_POINTER`: ``study_name`` and the
storage URL without its password, :func:`masked_url`), so a summary can be made from the folder.
"""

from __future__ import annotations

from pathlib import Path

import optuna

STUDY_POINTER = "study.json"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage of ``url``; a SQLite file gets its folder made and waits up to 60 s for its lock."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several drivers may share one file: wait for its lock instead of failing at once
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def load_study(storage: str, study_name: str | None) -> optuna.Study:
    """The study ``study_name`` of ``storage`` (the only one there when None); ValueError otherwise."""
    names = optuna.study.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{storage} holds {len(names)} studies ({', '.join(names)}): name one with --study")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"{storage} has no study {study_name!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=storage)


def masked_url(url: str) -> str:
    """The storage URL without its password (it is written into the log folder)."""
    if url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
