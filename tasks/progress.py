"""Progress bars for epochs, quiet when output is not a terminal and SHRINKFLOW_PROGRESS is unset."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable


def epoch_bar(desc: str, total_epochs: int) -> Callable[[Iterable, int], Iterable]:
    """A `wrap_epoch` for compression_ops.fit: one bar per epoch with the running loss hidden."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() or os.environ.get("SHRINKFLOW_PROGRESS") == "1"
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


def say(msg: str) -> None:
    print(f"[shrinkflow] {msg}", file=sys.stderr, flush=True)
