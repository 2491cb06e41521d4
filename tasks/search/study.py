"""The Optuna study behind a search: storage, sampler, pruner, and a trial budget shared by workers.

One study per pipeline run (`<pipeline>:<run_id>`), so re-running the search stage resumes it. Workers
(processes, Airflow mapped tasks, machines) share it through the storage: SQLite in the workspace by
default, PostgreSQL for many workers. A worker claims a trial under a lock (a PostgreSQL advisory
lock, or a file lock beside a SQLite file), so the study ends with exactly `n_trials` trials that
count, however many workers race for them. A running trial sends heartbeats; a trial whose worker died
goes stale, is marked failed and is queued again with the same parameters: the failed one stays in the
study, beside its retry, and does not count against the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tasks.config import SearchConfig
from tasks.errors import ConfigError
from tasks.workspace import RunPaths

# Heartbeats drive our ask/tell workers (Heartbeat below); Optuna expects them only under Study.optimize.
HEARTBEAT_WARNING = "Heartbeat of storage is supposed to be used with Study.optimize"

ATTR_WARM = "shrinkflow.warm_started"
ATTR_MLFLOW_PARENT = "shrinkflow.mlflow_search_run"


def storage_url(sc: SearchConfig, paths: RunPaths) -> str:
    """search.storage, $SHRINKFLOW_OPTUNA_STORAGE, or SQLite in the workspace."""
    return sc.storage or os.environ.get("SHRINKFLOW_OPTUNA_STORAGE") or f"sqlite:///{paths.root / 'optuna.db'}"


def study_name(paths: RunPaths) -> str:
    return f"{paths.pipeline}:{paths.run_id}"


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna at WARNING verbosity, without the warnings our ask/tell workers trigger by design (heartbeats
    outside Study.optimize, the heartbeat arguments being experimental); both restored on exit.

    Scoped rather than set at import, so importing this module changes nothing for its importer.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=HEARTBEAT_WARNING)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # stable enough
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) while a trial trains stops it at its next epoch boundary (interruption_point),
    not in the middle of a write to the study's storage, which left the session unusable and the trial
    neither re-queued nor failed; a second Ctrl-C stops at once. After the block, a pending Ctrl-C is
    raised as KeyboardInterrupt. Outside the main thread (where no handler can be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if _INTERRUPTED.is_set():
            _INTERRUPTED.clear()
            raise KeyboardInterrupt
        _INTERRUPTED.set()

    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except BaseException:
        _INTERRUPTED.clear()  # the block is stopping anyway
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if _INTERRUPTED.is_set():
        _INTERRUPTED.clear()
        raise KeyboardInterrupt


def interruption_point() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C is pending (see deferred_interrupt): call it at a safe point."""
    if _INTERRUPTED.is_set():
        _INTERRUPTED.clear()
        raise KeyboardInterrupt


def _storage(url: str, sc: SearchConfig) -> optuna.storages.RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=kwargs,
        heartbeat_interval=sc.heartbeat_seconds,
        grace_period=3 * sc.heartbeat_seconds,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
    )


def sampler_for(sc: SearchConfig, worker: int, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler. Each worker, and each resumption of the study (resumed_at: trials it
    held), gets its own seed, so nobody re-proposes the points a seeded sampler proposed before."""
    seed = sc.seed + 7919 * worker + 104729 * resumed_at
    # constraints: each trial sets its goal violations with trial.set_constraint (Optuna 5)
    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sc.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=max(4, min(50, sc.n_trials // 3)), seed=seed
        )
    startup = max(3, min(10, sc.n_trials // 3))
    return optuna.samplers.TPESampler(
        n_startup_trials=startup, multivariate=True, group=False, seed=seed,
        constant_liar=True,  # workers running side by side do not pile onto the same point
    )


def pruner_for(sc: SearchConfig) -> optuna.pruners.BasePruner:
    if sc.sampler in ("nsga2", "motpe") or sc.pruner == "none" or sc.trial_epochs < 2:
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    if sc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=sc.trial_epochs, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Goal violations a trial recorded (each <= 0 when met); an unmeasured trial violates everything."""
    return list(trial.user_attrs.get("constraints", [1.0]))


def open_study(sc: SearchConfig, paths: RunPaths, directions: list[str], worker: int = 0) -> optuna.Study:
    url = storage_url(sc, paths)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with quiet_optuna(), claim_lock(url, study_name(paths)):  # two workers creating the study would collide
        storage = _storage(url, sc)
        study = optuna.create_study(
            storage=storage, study_name=study_name(paths), directions=directions, load_if_exists=True
        )
        if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize"
                                      else optuna.study.StudyDirection.MINIMIZE for d in directions]:
            raise ConfigError(
                f"study {study.study_name} in {url.split('@')[-1]} was made for another sampler kind "
                f"({len(study.directions)} objective(s)); a run's search cannot switch between single and "
                "multi-objective: use a new run id"
            )
        study.sampler = sampler_for(sc, worker, len(study.get_trials(deepcopy=False)))
        study.pruner = pruner_for(sc)
        return study


@contextlib.contextmanager
def claim_lock(url: str, name: str) -> Iterator[None]:
    """Mutual exclusion between workers of one study: PostgreSQL advisory lock or a file lock."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    if url.startswith("postgresql"):
        import sqlalchemy as sa

        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    elif url.startswith("sqlite:///"):
        lock_path = Path(url.removeprefix("sqlite:///") + ".lock")
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        with _LOCAL_LOCK:
            yield


_LOCAL_LOCK = threading.Lock()


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of stale trials that were queued again (they do not count against the budget)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def budget_used(study: optuna.Study) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose worker stopped beating; Optuna warns that heartbeats are meant
    for Study.optimize, but ask/tell with our own Heartbeat thread is what the workers use."""
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)


def claim_trial(study: optuna.Study, sc: SearchConfig, url: str) -> optuna.Trial | None:
    """A trial to run, if the budget has room, else None; atomic across workers.

    Queued trials (warm starts, retries of stale trials) are inside the budget already and go first.
    """
    with quiet_optuna(), claim_lock(url, study.study_name):
        fail_stale(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and budget_used(study) >= sc.n_trials:
            return None
        trial = study.ask()
        # beat at once: a worker dying before its Heartbeat thread starts still leaves a trial that goes stale
        study._storage.record_heartbeat(trial._trial_id)
        return trial


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Fail an interrupted trial and queue its parameters again, as a stale trial would be."""
    with quiet_optuna(), contextlib.suppress(Exception):  # already told, or the storage is gone: heartbeats cover it
        study.tell(trial, state=TrialState.FAIL)
        frozen = study._storage.get_trial(trial._trial_id)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, frozen)


class Heartbeat:
    """Records the trial's heartbeat every interval while the trial runs (ask/tell has no thread of its own)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float):
        self._storage, self._trial_id, self._interval = study._storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat only risks a retry
                self._storage.record_heartbeat(self._trial_id)

    def __enter__(self) -> Heartbeat:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def unfinished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
