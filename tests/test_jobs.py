"""Jobs: steps with times and verdicts, failure, cancellation, shutdown, records on disk;
and the datastore's pause of a session that the control plane commits or removes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.datastore import sessions
from appliance.datastore.datastore import Datastore
from appliance.errors import NotFound, SessionBusy, TryAgain
from appliance.ingest.backup import backup
from appliance.jobs import Job, JobRunner, JobState
from appliance.store import ReadPath, Store
from tests.conftest import write_image


def run_jobs(directory: Path, works: list[tuple[str, Callable[[Job], dict[str, Any]]]],
             while_running: Callable[[list[Job]], None] = lambda jobs: None,
             shutdown_after: float | None = None) -> list[Job]:
    """Submit `works` to a runner and wait for all of them (or cancel the runner after a while)."""

    async def main() -> list[Job]:
        runner = JobRunner(directory)
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            jobs = [runner.submit(kind, {"n": index}, work) for index, (kind, work) in enumerate(works)]
            await trio.sleep(0.05)
            while_running(jobs)
            if shutdown_after is not None:
                await trio.sleep(shutdown_after)
                nursery.cancel_scope.cancel()
            else:
                while any(job.finished is None for job in jobs):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        return jobs

    return trio.run(main)


def two_steps(job: Job) -> dict[str, Any]:
    with job.step("mount", host="esx1"):
        pass
    with job.step("power-on") as step:
        step.detail = "powered on"
    return {"vm": "web"}


def fails_in_second_step(job: Job) -> dict[str, Any]:
    with job.step("mount"):
        pass
    with job.step("register"):
        raise NotFound("no .vmx at [ds] sessions/x/x.vmx")
    return {}


def waits(job: Job) -> dict[str, Any]:
    with job.step("verify"):
        job.sleep(60)
    return {}


def test_steps_result_and_record(tmp_path: Path) -> None:
    [job] = run_jobs(tmp_path, [("instant-boot", two_steps)])
    assert job.state is JobState.SUCCEEDED and job.result == {"vm": "web"} and job.error is None
    assert [(s.name, s.verdict) for s in job.steps] == [("mount", "ok"), ("power-on", "ok")]
    assert all(s.seconds is not None and s.seconds >= 0 for s in job.steps)
    assert any("event=job.step.ok" in line and "step=power-on" in line and 'detail="powered on"' in line
               for line in job.log)
    record = json.loads((tmp_path / f"{job.id}.json").read_text())
    assert record["state"] == "succeeded" and record["steps"][1]["detail"] == "powered on"


def test_failure_marks_the_step_and_the_job(tmp_path: Path) -> None:
    [job] = run_jobs(tmp_path, [("instant-boot", fails_in_second_step)])
    assert job.state is JobState.FAILED and "no .vmx" in (job.error or "")
    assert [(s.name, s.verdict) for s in job.steps] == [("mount", "ok"), ("register", "failed")]
    assert "no .vmx" in job.steps[1].detail


def test_cancel_reaches_a_waiting_job(tmp_path: Path) -> None:
    started = time.monotonic()
    [job] = run_jobs(tmp_path, [("instant-boot", waits)], while_running=lambda jobs: jobs[0].cancel())
    assert time.monotonic() - started < 10
    assert job.state is JobState.CANCELLED and job.steps[0].verdict == "cancelled"


def test_shutdown_cancels_running_jobs_and_a_restart_keeps_history(tmp_path: Path) -> None:
    started = time.monotonic()
    waiting, done = run_jobs(tmp_path, [("recovery-group", waits), ("instant-boot", two_steps)], shutdown_after=0.2)
    assert time.monotonic() - started < 10
    assert waiting.state is JobState.CANCELLED and done.state is JobState.SUCCEEDED
    record = json.loads((tmp_path / f"{waiting.id}.json").read_text())
    record["state"], record["finished"] = "running", None  # as if the process died mid-job
    (tmp_path / f"{waiting.id}.json").write_text(json.dumps(record))
    (tmp_path / "torn.json").write_text("{")
    reloaded = JobRunner(tmp_path)
    assert reloaded.get(waiting.id).state is JobState.INTERRUPTED
    assert reloaded.get(done.id).result == {"vm": "web"}
    with pytest.raises(NotFound):
        reloaded.get("nope")


def test_paused_session_refuses_changes_then_takes_them(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    store = store_factory()
    image = write_image(tmp_path / "disk.img", 1 << 20, seed=3)
    with ReadPath(store) as read_path:
        backup(store, "vm1", [image])
        datastore = Datastore(store, read_path)
        sessions.create_session(store, datastore.namespace, read_path, "vm1", "latest", "s1")
        folder = datastore.lookup(datastore.lookup(datastore.root_inode, "sessions").inode, "s1").inode
        flat = datastore.lookup(folder, "vm1-flat.vmdk").inode
        datastore.write(flat, 0, b"before")
        with datastore.session_paused("s1"):
            with pytest.raises(TryAgain):
                datastore.write(flat, 0, b"during")
            with pytest.raises(TryAgain):
                datastore.create(folder, "vmware.log", 0o644, 0, 0, False)
            with pytest.raises(SessionBusy):
                with datastore.session_paused("s1"):
                    pass
            assert datastore.read(flat, 0, 6) == b"before"  # reads go on, and see every acknowledged write
        datastore.write(flat, 0, b"after!")
        assert datastore.read(flat, 0, 6) == b"after!"
        datastore.close()
