"""Where a study lives: opening Optuna storage (SQL database or journal file), the liveness of
trials (heartbeats), and the sweep folder's pointer to the study.

Storage URLs (``optuna.storage``):

* any SQLAlchemy URL, e.g. ``sqlite:///logs/sweeps/s.db`` (the default) or
  ``postgresql://user@host/db``: :class:`optuna.storages.RDBStorage`;
* ``journal:<path>``, e.g. ``journal:/shared/sweeps/s.journal``: an append-only journal file
  (:class:`optuna.storages.JournalStorage` on a ``JournalFileBackend`` with its symlink lock),
  for a file system shared by the nodes of a cluster, where SQLite's locks are unreliable (NFS).

Liveness (several drivers on one study, e.g. a SLURM array of ``cirlab-sweep``): each driver
records a heartbeat of the trial it runs every ``heartbeat_interval`` seconds; a RUNNING trial
whose heartbeat is older than ``grace_period`` belonged to a driver that died (killed,
preempted, node lost). Such a trial is marked FAIL by the next driver that starts a trial
(:func:`optuna.storages.fail_stale_trials`) and queued again with the same parameters (up to
``max_retry`` times); a live trial of another driver is never touched. The SQL storage uses
Optuna's own heartbeat table; the journal storage, which Optuna gives no heartbeat, records it
as the trial's system attribute :data:`HEARTBEAT_ATTR` (:class:`HeartbeatJournalStorage`).

The driver writes ``<sweep_dir>/study.json`` (:data:`STUDY_POINTER`: ``study_name`` and the
storage URL without its password, :func:`masked_url`), so a summary can be made from the folder.
"""

from __future__ import annotations

import copy
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RetryHeartbeatStaleTrialCallback

# Optuna's heartbeat interface (read by fail_stale_trials) and the thread its optimize loop runs;
# the driver's ask/tell loop runs that thread itself (heartbeat_running)
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread, is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

STUDY_POINTER = "study.json"
JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIX = ".journal"  # a file named so is read as a journal by `cirlab-sweep summarize`
HEARTBEAT_ATTR = "cirlab:heartbeat"  # journal storage: unix time of the trial's last heartbeat
CREATE_ATTEMPTS = 5  # tries to open a SQL storage that another driver is creating
STALE_REASON = "its driver stopped: no heartbeat for more than {grace} s (killed, preempted or node lost)"


@dataclass(frozen=True)
class Liveness:
    """Heartbeat settings of a driver (seconds); ``max_retry``: times a stale trial is re-queued."""

    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 1

    def __post_init__(self) -> None:
        if self.heartbeat_interval < 1:
            raise ValueError(f"optuna.heartbeat_interval={self.heartbeat_interval} must be >= 1 (seconds)")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"optuna.grace_period={self.grace_period} must be longer than "
                             f"optuna.heartbeat_interval={self.heartbeat_interval}")
        if self.max_retry < 0:
            raise ValueError(f"optuna.max_retry={self.max_retry} must be >= 0")


def retry_callback(liveness: Liveness) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a stale trial again with its parameters, up to ``max_retry`` times."""
    with warnings.catch_warnings():  # experimental in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=liveness.max_retry)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file study with heartbeats, which Optuna's ``JournalStorage`` lacks.

    A heartbeat is the system attribute :data:`HEARTBEAT_ATTR` (unix time, one journal line per
    ``heartbeat_interval``). A RUNNING trial is stale when its newest heartbeat, recorded since
    it started, is older than ``grace_period``; like the SQL storage, a trial without one is not.
    Heartbeats compare the clocks of different machines: keep ``grace_period`` well above their
    skew (NTP keeps cluster nodes within a second).
    """

    def __init__(self, path: str | Path, liveness: Liveness | None = None) -> None:
        super().__init__(JournalFileBackend(str(path)))
        self._liveness = liveness
        self._stale_callback = retry_callback(liveness) if liveness else None

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another driver already ended it (it looked stale)
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self._liveness is not None
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            started = trial.datetime_start.timestamp() if trial.datetime_start else None
            if beat is None or (started is not None and beat < started):  # none yet (or a retry's copy)
                continue
            if now - float(beat) > self._liveness.grace_period:
                stale.append(trial._trial_id)
        return stale

    @property
    def heartbeat_interval(self) -> int | None:
        return self._liveness.heartbeat_interval if self._liveness else None

    @property
    def grace_period(self) -> int | None:
        return self._liveness.grace_period if self._liveness else None

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_callback


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:<path>`` URL, else None."""
    return Path(url[len(JOURNAL_PREFIX):]) if url.startswith(JOURNAL_PREFIX) else None


def open_storage(url: str, liveness: Liveness | None = None) -> BaseStorage:
    """The storage of ``url`` (module docstring), with heartbeats when ``liveness`` is given.

    The folder of a SQLite or journal file is made; a SQLite file waits up to 60 s for its lock
    (several drivers share it) instead of failing at once.
    """
    journal = journal_path(url)
    if journal is not None:
        if not url[len(JOURNAL_PREFIX):].strip() or journal.is_dir():
            raise ValueError(f"optuna.storage={url!r}: write journal:<path of the journal file>")
        journal.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(journal, liveness)
    heartbeat = {}
    if liveness is not None:
        heartbeat = {"heartbeat_interval": liveness.heartbeat_interval, "grace_period": liveness.grace_period,
                     "heartbeat_stale_trial_callback": retry_callback(liveness)}
    options: dict = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        options["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are experimental in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **options, **heartbeat)
        except SQLAlchemyError as error:
            # [why] drivers started together (a SLURM array) race to create the tables of a new
            # database; the losers fail on its version row. By the next try the tables exist.
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            log.info("storage %s not ready (%s): trying again", masked_url(url), type(error).__name__)
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def ask_live(study: optuna.Study) -> optuna.Trial:
    """A new trial of ``study`` (a queued retry first), after failing the stale ones (what
    ``Study.optimize`` does before each trial; the driver asks and tells itself)."""
    stale_trials_failed(study)
    with warnings.catch_warnings():  # "supposed to be used with Study.optimize": heartbeat_running does its part
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


@contextmanager
def heartbeat_running(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record ``trial``'s heartbeat every ``heartbeat_interval`` s (first at once) until the block
    ends; nothing when the storage has no heartbeat."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def retry_of(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of the stale trial that ``trial`` runs again, or None."""
    return study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")


def stale_trials_failed(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials of ``study`` whose heartbeat stopped, each with its
    ``fail_reason``, and queue them again (the storage's stale-trial callback); return their numbers.

    Optuna's ``fail_stale_trials`` does the same but cannot record why (a finished trial takes no
    user attribute). When several drivers see one stale trial, one of them wins the change of
    state and queues the retry; the others leave it.
    """
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return []
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON.format(grace=_grace(storage)))
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another driver got there first
            continue
        trial = storage.get_trial(trial_id)
        callback = storage.get_heartbeat_stale_trial_callback()
        retries = len(trial.system_attrs.get("retry_history", []))
        if callback is not None:  # the retry copies the user attributes: not the failure's reason
            callback(study, _without_reason(trial))
        log.warning("trial %d: %s; marked FAIL%s", trial.number, trial.user_attrs["fail_reason"],
                    "" if callback is None or retries >= callback._max_retry
                    else ", queued again with the same parameters")
        failed.append(trial.number)
    return failed


def _without_reason(trial: FrozenTrial) -> FrozenTrial:
    trial = copy.deepcopy(trial)
    trial.user_attrs.pop("fail_reason", None)
    return trial


def _grace(storage: BaseStorage) -> int:
    for candidate in (storage, getattr(storage, "_backend", None)):  # Optuna wraps an RDBStorage in a cache
        if getattr(candidate, "heartbeat_interval", None):
            return candidate.grace_period or 2 * candidate.heartbeat_interval
    raise ValueError("the storage has no heartbeat")


def load_study(storage: str, study_name: str | None) -> optuna.Study:
    """The study ``study_name`` of ``storage`` (the only one there when None); ValueError otherwise."""
    journal = journal_path(storage)
    if journal is not None and not journal.is_file():
        raise FileNotFoundError(f"{storage}: no such journal file")
    opened = open_storage(storage)
    names = [s.study_name for s in opened.get_all_studies()]
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{storage} holds {len(names)} studies ({', '.join(names)}): name one with --study")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"{storage} has no study {study_name!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=opened)


def masked_url(url: str) -> str:
    """The storage URL without its password (it is written into the log folder)."""
    if url.startswith(("sqlite", JOURNAL_PREFIX)):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)

