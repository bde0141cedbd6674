"""Worker threads for VFS calls, cheaper per call than `trio.to_thread.run_sync`.

Every NFS procedure blocks on the VFS, so every call crosses to a thread and back.
`trio.to_thread` pays per call for a capacity limiter, renaming the thread and one
wakeup of the event loop per result; under `qemu-img bench` (4 KiB reads, 16 deep) that
was about a third of the server's CPU. Here a fixed set of threads takes jobs from one
queue, and results that finish while the loop is busy go back with a single wakeup.

A waiting task cannot be cancelled (like `to_thread` without `abandon_on_cancel`): a VFS
call that started always completes, so shutdown never leaves one running against a
datastore that is being closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
DEFAULT_THREADS = 16

_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task]


class WorkerPool:
    """Runs blocking functions in its threads on behalf of trio tasks."""

    def __init__(self, threads: int, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: list[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]] = []
        self._flush_pending = False
        self._threads = [threading.Thread(target=self._work, name=f"nfs-worker-{n}", daemon=True)
                         for n in range(threads)]
        for thread in self._threads:
            thread.start()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a worker thread; returns or raises what it did."""
        self._jobs.put((function, args, trio.lowlevel.current_task()))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def close(self) -> None:
        """Let the threads end once the queue is empty."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, args, task = job
            result = outcome.capture(function, *args)
            with self._lock:
                self._finished.append((task, result))
                wake, self._flush_pending = not self._flush_pending, True
            if wake:
                self._token.run_sync_soon(self._flush)

    def _flush(self) -> None:
        """On the event loop: hand every finished result to its task."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._flush_pending = False
        for task, result in finished:
            trio.lowlevel.reschedule(task, result)


@asynccontextmanager
async def open_worker_pool(threads: int = DEFAULT_THREADS) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(threads, trio.lowlevel.current_trio_token())
    try:
        yield pool
    finally:
        pool.close()
