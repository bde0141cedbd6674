"""The HTTP API of a live `appliance serve`, driven with httpx; the CLI acting through it."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.test_nfs3 import OK, NfsClient
from tests.test_nfs_server import with_client
from tests.test_nfs_serve import Serve, store  # noqa: F401  (the served-store fixture)

API = "/api/v1"


class Api:
    """A started server and an httpx client holding its token."""

    def __init__(self, server: Serve) -> None:
        self.server = server
        self.base = f"http://127.0.0.1:{server.api_port}"
        self.token = (server.store / "api.token").read_text().strip()
        self.client = httpx.Client(base_url=self.base + API, headers={"Authorization": f"Bearer {self.token}"},
                                   timeout=60)

    def close(self) -> None:
        self.client.close()


def nfs_write(server: Serve, session: str, offset: int, data: bytes) -> None:
    """A FILE_SYNC write into a session's first disk by a raw NFSv3 client."""

    async def write(client: NfsClient) -> None:
        status, folder = await client.mnt(f"/sessions/{session}")
        assert status == OK
        await client.write(await client.lookup(folder, "vm1-flat.vmdk"), offset, data)

    with_client(server.ports, write)


def start_api(store: Path, *extra: str, portmap: bool = False) -> Api:
    """`serve` with its API up; `portmap` as in `Serve` (QEMU's nfs:// driver needs it)."""
    server = Serve(store, *extra, portmap=portmap)
    server.start()
    return Api(server)


@contextlib.contextmanager
def serving_api(store: Path) -> Iterator[Api]:
    """`serve` with its API up for the block; it must stop cleanly after it."""
    running = start_api(store)
    try:
        yield running
    finally:
        running.close()
        assert running.server.stop() == 0


@pytest.fixture
def api(store: Path) -> Iterator[Api]:
    """`serve` over the shared store fixture (vm1 backed up, session s1 made offline)."""
    running = start_api(store)
    yield running
    running.close()
    assert running.server.stop() == 0


def test_no_token_no_access(api: Api) -> None:
    mode = stat.S_IMODE((api.server.store / "api.token").stat().st_mode)
    assert mode == 0o600
    for path in (f"{API}/status", f"{API}/openapi.json", f"{API}/sessions", "/", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api.token},
                        {"Authorization": f"Bearer {api.token}x"}):
            response = httpx.get(api.base + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"] == "Unauthorized"
    deleted = httpx.delete(f"{api.base}{API}/sessions/s1")
    assert deleted.status_code == 401
    assert api.client.get("/sessions/s1").status_code == 200  # and nothing was removed


def test_openapi_document_lists_every_resource(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in ("/api/v1/status", "/api/v1/vms", "/api/v1/vms/{vm}/points", "/api/v1/sessions",
                 "/api/v1/sessions/{name}", "/api/v1/sessions/{name}/commit", "/api/v1/jobs", "/api/v1/jobs/{job_id}"):
        assert path in paths, path
    assert set(paths["/api/v1/sessions/{name}"]) == {"get", "delete"}


def test_vms_and_points(api: Api) -> None:
    vms = api.client.get("/vms").json()
    assert [vm["name"] for vm in vms] == ["vm1"] and vms[0]["points"] == 1
    points = api.client.get("/vms/vm1/points").json()
    assert points[0]["id"] == vms[0]["newest_point"] and points[0]["disks"][0]["name"] == "vm1"
    missing = api.client.get("/vms/nope/points")
    assert missing.status_code == 404 and "nope" in missing.json()["message"]


def test_session_lifecycle_while_serving(api: Api, tmp_path: Path) -> None:
    created = api.client.post("/sessions", json={"vm": "vm1", "name": "s2"})
    assert created.status_code == 201, created.text
    assert created.json()["point"] == api.client.get("/vms").json()[0]["newest_point"]
    listing = subprocess.run(["nfs-ls", api.server.url("/sessions/s2")], capture_output=True, timeout=60, check=True)
    assert b"vm1-flat.vmdk" in listing.stdout

    nfs_write(api.server, "s2", 4096, b"\xab" * 65536)
    committed = api.client.post("/sessions/s2/commit")
    assert committed.status_code == 200, committed.text
    point = committed.json()
    assert point["vm"] == "vm1" and point["parent"] == created.json()["point"]

    exported = tmp_path / "s2.img"
    answer = api.client.post("/sessions/s2/export", json={"disk": 0, "output": str(exported)})
    assert answer.status_code == 204, answer.text
    assert exported.read_bytes()[4096:4096 + 65536] == b"\xab" * 65536
    nfs_write(api.server, "s2", 0, b"\xcd" * 512)  # the session takes writes again after the commit

    assert api.client.delete("/sessions/s2").status_code == 204
    assert api.client.get("/sessions/s2").status_code == 404
    gone = subprocess.run(["nfs-ls", api.server.url("/sessions/s2")], capture_output=True, timeout=60, check=False)
    assert gone.returncode != 0

    restored = tmp_path / "restored.img"
    run_cli("--store", str(api.server.store), "restore", "--vm", "vm1", "--point", point["id"], "--output",
            str(restored), check=False)  # the store is served: restore reads it alongside
    assert restored.read_bytes() == exported.read_bytes()


def test_session_errors(api: Api) -> None:
    duplicate = api.client.post("/sessions", json={"vm": "vm1", "name": "s1"})
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "AlreadyExists"
    for bad in ("../x", "a/b", "", "..", "nul\x00byte", "x" * 81):
        answer = api.client.post("/sessions", json={"vm": "vm1", "name": bad})
        assert answer.status_code == 422 and answer.json()["error"] == "InvalidRequest", (bad, answer.text)
        assert "invalid session name" in answer.json()["message"]
    lone_surrogate = api.client.post("/sessions", content=b'{"vm": "vm1", "name": "\\udcff"}',
                                     headers={"Content-Type": "application/json"})
    assert lone_surrogate.status_code == 422 and "invalid session name" in lone_surrogate.json()["message"]
    unknown = api.client.post("/sessions", json={"vm": "ghost", "name": "g"})
    assert unknown.status_code == 404
    malformed = api.client.post("/sessions", json={"name": "x"})
    assert malformed.status_code == 422
    relative = api.client.post("/sessions/s1/export", json={"output": "relative.img"})
    assert relative.status_code == 422 and "absolute path" in relative.json()["message"]
    precious = api.server.store.parent / "precious"
    precious.write_bytes(b"not to be replaced")
    for target, reason in ((precious, "it exists"), (api.server.store.parent, "it exists"),
                           (api.server.store.parent / "missing" / "x.img", "No such file")):
        refused = api.client.post("/sessions/s1/export", json={"output": str(target)})
        assert refused.status_code == 409 and refused.json()["error"] == "OutputRefused", refused.text
        assert reason in refused.json()["message"]
    assert precious.read_bytes() == b"not to be replaced"
    assert not [p for p in api.server.store.parent.iterdir() if p.name.endswith(".tmp")]
    assert api.client.post("/sessions/ghost/commit").status_code == 404
    assert api.client.delete("/sessions/ghost").status_code == 404
    assert [s["name"] for s in api.client.get("/sessions").json()] == ["s1"]


def test_cli_acts_through_the_running_server(api: Api) -> None:
    store = str(api.server.store)
    made = run_cli("--store", store, "session", "create", "--vm", "vm1", "--point", "latest", "--name", "cli1")
    assert made.returncode == 0, made.stderr
    assert api.client.get("/sessions/cli1").status_code == 200
    listing = run_cli("--store", store, "session", "list")
    assert "cli1" in listing.stdout and "s1" in listing.stdout
    again = run_cli("--store", store, "session", "create", "--vm", "vm1", "--point", "latest", "--name", "cli1")
    assert again.returncode == 1 and "already exists" in again.stderr
    committed = run_cli("--store", store, "session", "commit", "cli1")
    assert committed.returncode == 0, committed.stderr
    assert committed.stdout.strip() in {p["id"] for p in api.client.get("/vms/vm1/points").json()}
    deleted = run_cli("--store", store, "session", "delete", "cli1")
    assert deleted.returncode == 0, deleted.stderr
    assert api.client.get("/sessions/cli1").status_code == 404


def test_limits_refuse_the_session_past_the_maximum(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[limits]\nmax_sessions = 2\n')
    running = start_api(store, "--config", str(config))
    try:
        assert running.client.post("/sessions", json={"vm": "vm1", "name": "s2"}).status_code == 201
        refused = running.client.post("/sessions", json={"vm": "vm1", "name": "s3"})
        assert refused.status_code == 429
        assert "limits.max_sessions is 2" in refused.json()["message"]
        cli = run_cli("--store", str(store), "session", "create", "--vm", "vm1", "--point", "latest", "--name", "s4")
        assert cli.returncode == 75 and "max_sessions" in cli.stderr
        assert running.client.delete("/sessions/s2").status_code == 204
        assert running.client.post("/sessions", json={"vm": "vm1", "name": "s3"}).status_code == 201
    finally:
        running.close()
        running.server.stop()


def test_expiry_ends_a_session(api: Api) -> None:
    answer = api.client.post("/sessions", json={"vm": "vm1", "name": "short", "expires_hours": 1 / 3600})
    assert answer.status_code == 201
    assert answer.json()["expires"] == pytest.approx(time.time() + 1, abs=5)
    deadline = time.monotonic() + 20
    while api.client.get("/sessions/short").status_code == 200:
        assert time.monotonic() < deadline, "the expired session was not ended"
        time.sleep(0.2)
    assert api.client.get("/sessions/s1").status_code == 200  # no expiry: kept


def test_events_are_logged_one_line_each(store: Path) -> None:
    running = start_api(store)
    try:
        assert running.client.post("/sessions", json={"vm": "vm1", "name": "logged"}).status_code == 201
        assert running.client.delete("/sessions/logged").status_code == 204
    finally:
        running.close()
        running.server.stop()
    lines = running.server.log_text().splitlines()
    created = [line for line in lines if "event=session.created" in line]
    assert len(created) == 1 and "session=logged" in created[0] and "vm=vm1" in created[0]
    assert any("event=session.deleted session=logged" in line for line in lines)


def test_api_token_file_must_be_private(store: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 40)
    os.chmod(token, 0o644)
    config = tmp_path / "appliance.toml"
    config.write_text(f'[api]\ntoken_file = "{token}"\n')
    result = run_cli("--store", str(store), "serve", "--config", str(config), "--no-portmap", "--nfs-port", "0",
                     "--mount-port", "0", "--no-metrics", timeout=60)
    assert result.returncode == 2 and str(token) in result.stderr


@pytest.mark.parametrize(("body", "reason"), [
    ({"vm": "vm1", "target": "vsphere"}, "needs the ESXi host"),
    ({"vm": "vm1", "target": "qemu", "verify": "tools"}, "QEMU guest reports no tools"),
    ({"vm": "vm1", "target": "vsphere", "host": "h", "verify": "console:up"}, "no console"),
    ({"vm": "vm1", "target": "qemu", "verify": "ping"}, "unknown verification"),
])
def test_instant_boot_requests_are_checked_before_a_job_starts(api: Api, body: dict[str, object], reason: str) -> None:
    answer = api.client.post("/instant-boots", json=body)
    assert answer.status_code == 422 and reason in answer.json()["message"], answer.text
    assert api.client.get("/jobs").json() == []


def test_boots_migrations_and_stops_of_unknown_sessions_are_refused(api: Api) -> None:
    assert api.client.post("/migrations", json={"session": "ghost", "destination": "ds"}).status_code == 404
    assert api.client.post("/sessions/ghost/stop", json={}).status_code == 404
    malformed = api.client.post("/recovery-groups", json={"plan": "[group\nname=", "source": "p.toml"})
    assert malformed.status_code == 400 and "p.toml" in malformed.json()["message"]
    cyclic = api.client.post("/recovery-groups", json={"plan": '[group]\nname="g"\nqemu=true\n[[vms]]\nname="a"\n'
                                                                'after=["a"]\nverify="none"\n', "source": "p.toml"})
    assert cyclic.status_code == 400 and "cycle" in cyclic.json()["message"]
    assert api.client.get("/jobs").json() == []


def test_the_stores_own_token_must_be_private_too(store: Path) -> None:
    token = store / "api.token"
    token.write_text("y" * 40)
    os.chmod(token, 0o644)
    result = run_cli("--store", str(store), "serve", "--no-portmap", "--nfs-port", "0", "--mount-port", "0",
                     "--no-metrics", "--api-port", "0", timeout=60)
    assert result.returncode == 2 and f"{token}: the API token is readable by others" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_method_is_405_with_the_whole_allow(api: Api) -> None:
    """/sessions is served by two routes (GET, POST): Allow names both, whichever the router met first."""
    answer = api.client.put("/sessions", json={})
    assert answer.status_code == 405 and answer.json()["error"] == "MethodNotAllowed"
    assert answer.headers["Allow"] == "GET, POST"
    assert api.client.patch("/sessions/s1").headers["Allow"] == "DELETE, GET"
    unknown = api.client.get("/no-such-thing")
    assert unknown.status_code == 404 and unknown.json()["error"] == "NotFound"


def test_every_error_an_operation_answers_with_is_documented(api: Api) -> None:
    """Each operation declares 401 and its own errors, all with the one error body."""
    document = api.client.get("/openapi.json").json()
    create = document["paths"][f"{API}/sessions"]["post"]["responses"]
    assert {"201", "401", "404", "409", "422", "429"} <= set(create)
    assert create["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    name = document["components"]["schemas"]["SessionCreate"]["properties"]["name"]
    assert name["minLength"] == 1 and name["maxLength"] == 80 and name["pattern"].startswith("^[")
