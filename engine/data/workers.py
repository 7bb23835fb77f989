"""Worker processes for the data pipeline's per-row stages (``data.num_proc``).

Reading rows into conversations, rendering, masking and tokenizing are pure Python per row
(the fast tokenizer's batches aside), so one core does them unless the rows are cut into
chunks for other processes. :func:`map_chunks` runs a stage over consecutive chunks and hands
the results back **in chunk order**, whatever finished first: the caller replays each chunk's
bad rows and warnings in that order, so the counts, the skipped-row list and the first error
are the same with one worker or many.

The workers are forked: they inherit the rows, the template and the tokenizer of the parent
without pickling them, and only a chunk's result travels back. Where ``fork`` does not exist
(Windows), or the data is too small to pay for a process, the chunks run in this process
through the same functions.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["worker_count", "map_chunks", "MIN_ROWS_FOR_WORKERS"]

#: Below this many rows a stage runs in this process: forking costs more than it saves.
MIN_ROWS_FOR_WORKERS = 512

#: What the forked workers read: set in the parent just before the fork, cleared after.
_STATE: dict[str, Any] = {}


def worker_count(setting: int) -> int:
    """``data.num_proc``: 0 means one per CPU core this process may use."""
    if setting > 0:
        return setting
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def _call(job: tuple[Callable[..., Any], int, int]) -> Any:
    fn, lo, hi = job
    return fn(lo, hi, _STATE)


def map_chunks(fn: Callable[[int, int, dict[str, Any]], Any], n: int, chunk: int, processes: int,
               state: dict[str, Any]) -> Iterator[Any]:
    """``fn(lo, hi, state)`` over ``[0, n)`` in chunks of ``chunk`` items, results in chunk order.

    ``fn`` must be a module-level function (it is pickled by name). An exception a chunk
    raises is raised here when that chunk's turn comes, after every earlier chunk's result.
    """
    jobs = [(fn, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    if processes <= 1 or len(jobs) <= 1 or n < MIN_ROWS_FOR_WORKERS or "fork" not in multiprocessing.get_all_start_methods():
        for job in jobs:
            yield job[0](job[1], job[2], state)
        return
    global _STATE
    # The parent's tokenizer may have used its Rust threads already; a forked child must not
    # (the tokenizers library would warn once per worker and turn them off itself).
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE = state
    try:
        with multiprocessing.get_context("fork").Pool(min(processes, len(jobs))) as pool:
            yield from pool.imap(_call, jobs)
    finally:
        _STATE = {}
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
