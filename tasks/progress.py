"""Stage progress: `say` lines on the `shrinkflow` logger, and epoch bars on a terminal.

Where a line ends up depends on who runs the stage. From a terminal (`shrinkflow run`, `python -m
tasks`, DVC) it is "[shrinkflow] ..." on stderr, as it always was. Inside a task that Airflow's task
runner supervises (the scheduler's workers), stderr is captured as `task.stderr` at level error, so
the record goes to the task runner's own logging handlers instead, which send it to the task log
with its level: info for progress, warning and error for those.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable

logger = logging.getLogger("shrinkflow")


def in_supervised_airflow_task() -> bool:
    """Whether this process is a task that Airflow's supervisor runs (its logging feeds the task log).

    The task runner's `main` sets `SUPERVISOR_COMMS` to its socket decoder; `dag.test` (what
    `shrinkflow run` uses) runs tasks in-process with an in-memory stand-in and keeps our stderr.
    """
    task_runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    if comms is None:
        return False
    from airflow.sdk.execution_time.comms import CommsDecoder

    return isinstance(comms, CommsDecoder)


class _ProgressHandler(logging.Handler):
    """Writes "[shrinkflow] ..." to the current stderr, or hands the record to an Airflow task's logging."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if in_supervised_airflow_task():
                # Airflow configured the root handlers to send JSON records, levels kept, to the task log.
                logging.getLogger().handle(record)
                return
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            stream = sys.stderr  # looked up now: `shrinkflow run` tees it into the run's log file
            stream.write(f"[shrinkflow] {level}{record.getMessage()}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _install() -> None:
    if not any(isinstance(h, _ProgressHandler) for h in logger.handlers):
        logger.addHandler(_ProgressHandler())
    logger.setLevel(logging.INFO)
    # Our handler decides where records go; propagating as well would print them twice.
    logger.propagate = False


_install()


def say(msg: str, level: int = logging.INFO) -> None:
    """One progress line of a stage (info; pass logging.WARNING for a line the user must not miss)."""
    _install()  # a logging.config.dictConfig since import may have reset the logger
    logger.log(level, msg)


def epoch_bar(desc: str, total_epochs: int) -> Callable[[Iterable, int], Iterable]:
    """A `wrap_epoch` for compression_ops.fit: one bar per epoch with the running loss hidden."""
    from tqdm.auto import tqdm

    enabled = (sys.stderr.isatty() or os.environ.get("SHRINKFLOW_PROGRESS") == "1") and not (
        in_supervised_airflow_task()  # a supervised task's fd 2 is the task log: error-level noise there
    )
    # The terminal itself: inside an Airflow task sys.stderr is a log redirect that tqdm cannot drive
    # (its writes fail there and tqdm silently disables itself), and bars have no place in log files.
    stream = sys.__stderr__ or sys.stderr

    def wrap(batches: Iterable, epoch: int) -> Iterable:
        return tqdm(
            batches,
            desc=f"{desc} epoch {epoch + 1}/{total_epochs}",
            total=len(batches),  # type: ignore[arg-type]
            leave=True,
            disable=not enabled,
            dynamic_ncols=True,
            file=stream,
        )

    return wrap
