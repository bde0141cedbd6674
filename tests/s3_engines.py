"""What the tests' real S3 engines (SeaweedFS in `tests/seaweed.py`, Ceph RGW in `tests/ceph.py`) share.

Both serve one bucket on a free loopback port with the same keys, run their daemons in process
groups of their own (so a stop leaves nothing behind, whatever they forked), and count as up only
when a bucket made through S3 takes an object PUT and gives it back: both listen seconds before
their storage can answer, so an open port proves nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import boto3
import obstore
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from obstore.exceptions import BaseError
from obstore.store import S3Store

from appliance.store.s3 import S3Location

ACCESS_KEY = "appliance-test"
SECRET_KEY = "appliance-test-secret"
BUCKET = "appliance"
REGION = "us-east-1"
#: CreateBucket's answers when the bucket is there already (a restarted engine keeps it).
BUCKET_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_daemon(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A session of its own makes the daemon a process group that `stop_daemons` ends whole."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_daemons(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to every group at once, SIGKILL to what is left after `grace` seconds: the engines linger
    in their shutdowns, and what they acknowledged is on disk already (a kill is an engine crash,
    which the store must survive too)."""
    for process in processes:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class S3Engine(ABC):
    """One engine under `root`; `restart` keeps its data, keys and endpoint (a restart mid-operation)."""

    name: ClassVar[str]
    start_timeout: ClassVar[float]

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.credentials_file = root / "credentials.toml"
        self.credentials_file.write_text(f'access_key_id = "{ACCESS_KEY}"\nsecret_access_key = "{SECRET_KEY}"\n')
        self.credentials_file.chmod(0o600)

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def client(self, bucket: str = BUCKET) -> S3Store:
        return S3Store(bucket, endpoint=self.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                       secret_access_key=SECRET_KEY, virtual_hosted_style_request=False,
                       client_options={"allow_http": True}, retry_config={"max_retries": 0})

    def location(self, prefix: str, endpoint: str | None = None) -> S3Location:
        return S3Location(endpoint=endpoint or self.endpoint, bucket=BUCKET, prefix=prefix,
                          credentials_file=str(self.credentials_file))

    def wait_until_answering(self, daemons: list[subprocess.Popen[bytes]]) -> None:
        """Until the S3 round trip succeeds; a daemon that exits or an engine still mute at the deadline
        stops the engine and fails the start, naming where its logs are."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            exited = [process.args for process in daemons if process.poll() is not None]
            if exited:
                self.stop()
                raise RuntimeError(f"{self.name}: {exited[0]!r} exited: see the logs under {self.root}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} S3 did not answer within {self.start_timeout:.0f} s: "
                                   f"see the logs under {self.root}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The bucket exists (made through S3, as any client would) and an object PUT reads back."""
        admin = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                             aws_secret_access_key=SECRET_KEY,
                             config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30))
        try:
            admin.create_bucket(Bucket=BUCKET)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in BUCKET_EXISTS:
                return False
        except BotoCoreError:
            return False
        try:
            obstore.put(self.client(), "probe", b"up")
            return bytes(obstore.get(self.client(), "probe").bytes()) == b"up"
        except (BaseError, OSError):
            return False
