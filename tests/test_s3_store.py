"""The S3 pack backend against a real SeaweedFS: objects are immutable, and every fault of the engine or
the network is a retry or a clear error, never wrong data."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import obstore
import pytest

from appliance.errors import ConfigError, IntegrityError, StoreError
from appliance.ingest.backup import backup
from appliance.restore import restore_disk
from appliance.store import ReadPath, formats, init_store, open_store, writer
from appliance.store.s3 import S3Location, S3PackBackend, S3Retry, read_credentials
from appliance.store.verify import verify
from tests.conftest import SMALL_CHUNK, record_holding, run_cli, sha256_of, write_image
from tests.test_nfs_serve import Serve
from tests.s3_proxy import FaultyProxy
from tests.s3_engines import ACCESS_KEY, SECRET_KEY, S3Engine

QUICK = S3Retry(max_retries=3, first_backoff=0.05, max_backoff=0.2, give_up_after=3.0, request_timeout=1.0)


@pytest.fixture
def proxy(s3_engine: S3Engine) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(s3_engine.endpoint)
    yield faulty
    faulty.close()


def backend(engine: S3Engine, tmp_path: Path, endpoint: str | None = None, retry: S3Retry = QUICK) -> S3PackBackend:
    location = engine.location(f"{uuid.uuid4().hex[:12]}/", endpoint)
    return S3PackBackend(location, (ACCESS_KEY, SECRET_KEY), tmp_path / "tmp", retry)


def sealed_pack(packs: S3PackBackend, pack_id: int, payload: bytes) -> int:
    """Seal a pack of one uncompressed record of `payload`; returns where the payload starts."""
    pack = packs.open_writer(pack_id)
    offset = pack.append(record_holding(payload))
    pack.seal()
    return offset + formats.RECORD_HEADER_SIZE


def test_objects_are_immutable_and_reads_exact(s3_engine: S3Engine, tmp_path: Path) -> None:
    packs = backend(s3_engine, tmp_path)
    payload = bytes(range(256)) * 64
    offset = sealed_pack(packs, 7, payload)
    assert obstore.head(s3_engine.client(), packs.key_of(7))["size"] == packs.pack_size(7) == offset + len(payload)
    assert packs.key_of(7).endswith("packs/07/0000000000000007.pack")
    assert packs.read_range(7, offset + 10, 300) == payload[10:310]
    with pytest.raises(IntegrityError, match=r"truncated.*s3://|s3://.*truncated"):
        packs.read_range(7, offset + len(payload) - 10, 20)
    second = packs.open_writer(7)
    second.append(record_holding(b"other bytes"))
    with pytest.raises(StoreError, match="already exists"):
        second.seal()
    assert packs.read_range(7, offset, len(payload)) == payload  # the first writer's bytes stand
    assert list(packs.list_packs()) == [7]
    packs.delete(7)
    with pytest.raises(IntegrityError, match=r"s3://appliance/.*0000000000000007.pack is missing"):
        packs.pack_size(7)


def test_503s_are_retried_then_reported(s3_engine: S3Engine, proxy: FaultyProxy, tmp_path: Path) -> None:
    packs = backend(s3_engine, tmp_path, proxy.endpoint)
    proxy.faults.unavailable = 2
    offset = sealed_pack(packs, 1, b"sealed through two 503s")
    proxy.faults.unavailable = 2
    assert packs.read_range(1, offset, 6) == b"sealed"
    assert proxy.faults.spoiled == 4
    proxy.faults.unavailable = 1000
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"S3 GET of s3://.*0000000000000001.pack failed.*503"):
        packs.read_range(1, offset, 6)
    assert time.monotonic() - started < 10


def test_slow_and_cut_reads_are_retried_or_fail_never_short(s3_engine: S3Engine, proxy: FaultyProxy,
                                                             tmp_path: Path) -> None:
    packs = backend(s3_engine, tmp_path, proxy.endpoint)
    payload = bytes(range(256)) * 1024
    offset = sealed_pack(packs, 2, payload)
    proxy.faults.cut_bodies = 2
    assert packs.read_range(2, offset, len(payload)) == payload
    assert proxy.faults.spoiled == 2
    proxy.faults.delay = 0.3  # slower than usual, faster than the timeout
    assert packs.read_range(2, offset, 1000) == payload[:1000]
    proxy.faults.delay = 1.5  # slower than the 1 s request timeout: every try times out
    with pytest.raises(StoreError, match=r"S3 GET of s3://.*failed"):
        packs.read_range(2, offset, 1000)


def test_a_put_whose_answer_is_lost_is_sent_again_and_finds_itself(s3_engine: S3Engine, proxy: FaultyProxy,
                                                                    tmp_path: Path) -> None:
    """As when the engine restarts under a PUT: the object landed but no answer came. obstore gives up on such
    a PUT; the store sends it again, and a create-only PUT that finds its own bytes has succeeded."""
    packs = backend(s3_engine, tmp_path, proxy.endpoint)
    proxy.faults.lost_answers = 2
    offset = sealed_pack(packs, 3, b"landed before the connection dropped")
    assert proxy.faults.spoiled == 2
    assert packs.read_range(3, offset, 6) == b"landed"
    other = packs.open_writer(3)
    other.append(record_holding(b"a second writer's bytes"))
    with pytest.raises(StoreError, match="already exists"):
        other.seal()


def test_sequential_reads_merge_neighbouring_chunks_into_one_get(s3_engine: S3Engine, proxy: FaultyProxy,
                                                                 tmp_path: Path) -> None:
    """Read-ahead asks for a run of chunks at once; records side by side in a pack come in one ranged GET."""
    init_store(tmp_path / "store", chunk_size=SMALL_CHUNK,
               s3=s3_engine.location(f"{uuid.uuid4().hex[:12]}/", proxy.endpoint))
    image = write_image(tmp_path / "disk.img", 8 << 20, seed=4)
    with open_store(tmp_path / "store") as store:
        point = backup(store, "vm", [image])
        stored = int(point.stats["new_chunks"])
        proxy.requests.clear()
        with ReadPath(store) as read_path:
            reader = read_path.disk(point, 0)
            data = b"".join(reader.read(offset, 1 << 20) for offset in range(0, 8 << 20, 1 << 20))
    assert data == image.read_bytes()
    ranged = [request for request in proxy.requests if request[0] == "GET" and request[2]]
    header_checks = sum(1 for _, _, byte_range in ranged if byte_range == f"bytes=0-{formats.PACK_HEADER_SIZE - 1}")
    assert stored > 64 and len(ranged) - header_checks <= stored // 4, (stored, len(ranged), header_checks)


@pytest.mark.slow
def test_engine_restart_mid_backup_is_ridden_out(s3_engine: S3Engine, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine goes down and comes back while packs are being sealed (SeaweedFS whole, Ceph its RGW);
    the backup waits it out, PUTs cut off in flight included (they are sent again), and what it
    committed restores byte-identical."""
    monkeypatch.setattr(writer, "PACK_TARGET_SIZE", 256 << 10)
    image = write_image(tmp_path / "disk.img", 24 << 20, seed=8)
    init_store(tmp_path / "store", chunk_size=SMALL_CHUNK, s3=s3_engine.location(f"{uuid.uuid4().hex[:12]}/"))
    with open_store(tmp_path / "store") as store:
        restarted = threading.Event()

        def restart_after_first_pack() -> None:
            while next(store.packs.list_packs(), None) is None:
                time.sleep(0.01)
            s3_engine.restart(down_for=1.0)
            restarted.set()

        restarter = threading.Thread(target=restart_after_first_pack)
        restarter.start()
        point = backup(store, "vm", [image])
        back_before_the_end = restarted.is_set()
        restarter.join()
        assert back_before_the_end  # the whole outage fell inside the backup, which waited it out
        assert len(list(store.packs.list_packs())) > 1
        assert verify(store, full=True).problems == []
        restore_disk(store, point, 0, tmp_path / "out.img")
    assert sha256_of(tmp_path / "out.img") == sha256_of(image)


def test_opening_without_credentials_is_a_config_error(s3_engine: S3Engine, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_S3_ACCESS", ACCESS_KEY)
    monkeypatch.setenv("TEST_S3_SECRET", SECRET_KEY)
    location = S3Location(endpoint=s3_engine.endpoint, bucket="appliance", prefix=f"{uuid.uuid4().hex[:12]}/",
                          access_key_env="TEST_S3_ACCESS", secret_key_env="TEST_S3_SECRET")
    init_store(tmp_path / "store", s3=location)
    assert '"access_key_env": "TEST_S3_ACCESS"' in (tmp_path / "store" / "config").read_text(errors="replace")
    assert SECRET_KEY not in (tmp_path / "store" / "config").read_text(errors="replace")
    with pytest.raises(StoreError, match="already holds a store: give another prefix, or --join it"):
        with open_store(tmp_path / "store") as store:
            sealed_pack(store.packs, 1, b"x")  # type: ignore[arg-type]
        init_store(tmp_path / "again", s3=location)
    monkeypatch.delenv("TEST_S3_SECRET")
    with pytest.raises(ConfigError, match=r'key "secret_key_env".*TEST_S3_SECRET is not set'):
        open_store(tmp_path / "store")
    loose = tmp_path / "loose.toml"
    loose.write_text('access_key_id = "a"\nsecret_access_key = "b"\n')
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match=r'key "credentials_file".*chmod 600'):
        read_credentials(S3Location(endpoint="http://x", bucket="b", credentials_file=str(loose)), "test")


@pytest.mark.slow
def test_serve_reads_back_over_nfs_from_an_s3_store(s3_engine: S3Engine, tmp_path: Path) -> None:
    """The CLI makes an S3 store, backs up into it, and `serve` answers NFS reads with the image's bytes."""
    store = tmp_path / "store"
    prefix = f"{uuid.uuid4().hex[:12]}/cli"
    run_cli("--store", str(store), "init", "--s3-endpoint", s3_engine.endpoint, "--s3-bucket", "appliance",
            "--s3-prefix", prefix, "--s3-credentials-file", str(s3_engine.credentials_file), check=True)
    assert SECRET_KEY not in (store / "config").read_text(errors="replace")
    image = write_image(tmp_path / "disk.img", 3 << 20, seed=6)
    run_cli("--store", str(store), "backup", "--vm", "vm1", str(image), check=True)
    run_cli("--store", str(store), "session", "create", "--vm", "vm1", "--point", "latest", "--name", "s1",
            check=True)
    assert not list((store / "packs").glob("*/*.pack"))  # sealed packs live in the bucket only
    assert [key for key in S3PackBackend(s3_engine.location(prefix + "/"), (ACCESS_KEY, SECRET_KEY),
                                         tmp_path / "tmp").list_keys("packs/")]
    server = Serve(store)
    server.start()
    try:
        flat = subprocess.run(["nfs-cat", server.url("/sessions/s1/vm1-flat.vmdk")], capture_output=True,
                              timeout=60, check=True)
        assert flat.stdout == image.read_bytes()
    finally:
        assert server.stop() == 0
    config = tmp_path / "appliance.toml"
    config.write_text(f'[store]\npath = "{store}"\nbackend = "s3"\nendpoint = "{s3_engine.endpoint}"\n'
                      f'bucket = "appliance"\nprefix = "other/"\ncredentials_file = "{s3_engine.credentials_file}"\n'
                      "[api]\nenabled = false\n[metrics]\nenabled = false\n")
    refused = run_cli("serve", "--config", str(config))
    assert refused.returncode == 2 and 'key "store.prefix"' in refused.stderr and f"{prefix}/" in refused.stderr
