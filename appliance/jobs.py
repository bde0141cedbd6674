"""Asynchronous jobs of a serving appliance: instant boots, recovery groups, migrations.

An operator's request that takes minutes (mount, register, power on, wait for the guest)
becomes a `Job`: the API answers at once with its id, and the job records each step
(time taken, verdict), log lines and its result as it goes, so a caller can poll its
progress and an operator can read afterwards what happened and why it failed. The work
itself is a plain synchronous function run in a worker thread; it calls `Job.step` and
`Job.sleep` so cancellation (shutdown, or an operator's cancel) reaches it between steps
and inside waits. Every job is written to ``STORE/jobs/<id>.json`` as it changes; a job
found running at start belonged to a process that died and is marked interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from appliance.durable import replace_atomically
from appliance.errors import ApplianceError, NotFound
from appliance.events import event
from appliance.names import JOB_ID

#: Finished jobs kept (in memory and on disk); older ones are forgotten at start.
KEEP_FINISHED = 500
#: Jobs running at once; more wait their turn (the limits on boots refuse far earlier).
MAX_RUNNING_JOBS = 64

Work = Callable[["Job"], dict[str, Any]]


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the serving process stopped while it ran


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED})


class JobCancelled(ApplianceError):
    """Raised inside a job's work when it has been asked to stop."""


@dataclass
class Step:
    name: str
    started: float
    finished: float | None = None
    verdict: str = "running"  # running | ok | failed | cancelled
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else round(self.finished - self.started, 3)


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    created: float
    state: JobState = JobState.QUEUED
    started: float | None = None
    finished: float | None = None
    steps: list[Step] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _changed: Callable[[Job], None] = field(default=lambda job: None, repr=False, compare=False)

    def note(self, name: str, level: int = logging.INFO, /, **fields: object) -> None:
        """Log an operator-visible event and keep its line in the job's own log."""
        self.log.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event(name, level, job=self.id, **fields)}")
        self._changed(self)

    @contextlib.contextmanager
    def step(self, name: str, /, **fields: object) -> Iterator[Step]:
        """Time one step; an exception marks it failed (and goes on up)."""
        self.check_cancelled()
        record = Step(name, time.time())
        self.steps.append(record)
        self.note("job.step.started", step=name, **fields)
        try:
            yield record
        except JobCancelled:
            record.verdict, record.finished = "cancelled", time.time()
            self.note("job.step.cancelled", step=name)
            raise
        except BaseException as exc:
            record.verdict, record.finished, record.detail = "failed", time.time(), str(exc)
            self.note("job.step.failed", logging.WARNING, step=name, reason=str(exc))
            raise
        record.verdict, record.finished = "ok", time.time()
        self.note("job.step.ok", step=name, seconds=record.seconds, detail=record.detail or None)

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.id} was cancelled")

    def sleep(self, seconds: float) -> None:
        """Wait inside a step; returns early with `JobCancelled` when the job is cancelled."""
        if self._cancel.wait(seconds):
            raise JobCancelled(f"job {self.id} was cancelled")

    def cancel(self) -> None:
        self._cancel.set()

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "params": self.params, "created": self.created,
                "state": self.state.value, "started": self.started, "finished": self.finished,
                "steps": [dict(asdict(step), seconds=step.seconds) for step in self.steps],
                "log": list(self.log), "result": self.result, "error": self.error}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Job:
        steps = [Step(**{k: v for k, v in step.items() if k != "seconds"}) for step in doc["steps"]]
        return cls(**{**doc, "state": JobState(doc["state"]), "steps": steps})


class JobRunner:
    """Starts jobs in its own nursery and keeps their records (thread-safe reads)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._directory.mkdir(exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._nursery: trio.Nursery | None = None
        #: Jobs wait for minutes: their own threads, so NFS and FUSE workers never queue behind them.
        self._threads = trio.CapacityLimiter(MAX_RUNNING_JOBS)
        self._load()

    def _load(self) -> None:
        found = []
        for path in self._directory.glob("*.json"):
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a record torn by a crash: history only, never needed to run
            if job.state not in FINISHED:
                job.state, job.error = JobState.INTERRUPTED, "the appliance stopped while this job ran"
                job.finished = job.finished or time.time()
                self._save(job)
            found.append(job)
        found.sort(key=lambda job: job.created)
        for job in found[:-KEEP_FINISHED]:
            (self._directory / f"{job.id}.json").unlink(missing_ok=True)
        self._jobs = {job.id: job for job in found[-KEEP_FINISHED:]}

    def _save(self, job: Job) -> None:
        with self._lock:
            text = json.dumps(job.to_dict())
        replace_atomically(self._directory / f"{job.id}.json", text.encode())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery jobs run in; on cancellation, ask every job to stop and wait."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def submit(self, kind: str, params: dict[str, Any], work: Work) -> Job:
        """Start `work` as a new job (call from the trio loop); returns at once."""
        if self._nursery is None:
            raise ApplianceError("jobs are not running (the appliance is shutting down)")
        job = Job(id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", kind=kind, params=params,
                  created=time.time(), _changed=self._save)
        with self._lock:
            self._jobs[job.id] = job
        self._save(job)
        self._nursery.start_soon(self._run, job, work)
        return job

    async def _run(self, job: Job, work: Work) -> None:
        job.state, job.started = JobState.RUNNING, time.time()
        job.note("job.started", kind=job.kind)
        done = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._cancel_on_shutdown, job, done)
        try:
            with trio.CancelScope(shield=True):  # shutdown reaches the thread through job.cancel
                job.result = await trio.to_thread.run_sync(work, job, limiter=self._threads)
            job.state = JobState.SUCCEEDED
        except JobCancelled as exc:
            job.state, job.error = JobState.CANCELLED, str(exc)
        except Exception as exc:  # the job's verdict: recorded, not raised into the server
            job.state, job.error = JobState.FAILED, str(exc) or type(exc).__name__
        finally:
            done.set()
        job.finished = time.time()
        job.note("job.finished", logging.INFO if job.state is JobState.SUCCEEDED else logging.WARNING,
                 kind=job.kind, state=job.state.value, seconds=round(job.finished - job.started, 3),
                 reason=job.error)

    @staticmethod
    async def _cancel_on_shutdown(job: Job, done: trio.Event) -> None:
        """Beside each job, unshielded: when the runner is cancelled, tell the job to stop."""
        try:
            await done.wait()
        finally:
            if not done.is_set():
                job.cancel()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(JOB_ID.check(job_id))
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created)
